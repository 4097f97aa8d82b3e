"""Evaluation: perplexity (:mod:`.perplexity`), lm-eval glue and the offline cloze task (:mod:`.lmeval`), and the
flatness / quantization-error figures (:mod:`.plots`).

Nothing is re-exported here, so importing one module does not import the others (the figures' and lm-eval's
dependencies are optional); the command line of all three lives in :mod:`flatquant.cli`.
"""
