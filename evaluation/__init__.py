"""Evaluation of a TSE checkpoint (evaluate.py is the command line).

* ``sources``: the samples (validation set, triplet folders, CSV lists) and their transcripts;
* ``metrics``: one function per metric, each with its definition, reference and input rate;
* ``runner``: extraction through ``inference.Extractor`` (whole and chunked), metric workers;
* ``report``: statistics, breakdowns, the CSV/JSON/Markdown outputs and the figures;
* ``signal``: the mono, resampled input of the model-based metrics;
* ``speaker_similarity``, ``dnsmos``, ``asr``, ``visqol``: the metrics that need a model shipped
  inside a package (Resemblyzer's GE2E encoder, DNSMOS ONNX models, PocketSphinx, ViSQOL's SVR),
  loaded once per process.
"""
