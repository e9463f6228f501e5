"""Evaluation of a TSE checkpoint (evaluate.py is the command line).

* ``sources``: the samples (validation set, triplet folders, CSV lists) and their transcripts;
* ``metrics``: one function per metric, each with its definition, reference, input rate and
  what it does with a long signal;
* ``scoring``: the metrics grouped into units (what a crash costs) and a sample's row;
* ``runner``: extraction through ``Extractor`` (extraction/) (whole and chunked), skipped samples;
* ``isolation``: the metric worker processes, crash and hang detection, scratch files;
* ``report``: statistics, breakdowns, the CSV/JSON/Markdown outputs and the figures;
* ``signal``: long-signal helpers (segments, blocks, streaming resampling);
* ``speaker_similarity``, ``dnsmos``, ``asr``, ``visqol``: the metrics that need a model shipped
  inside a package (Resemblyzer's GE2E encoder, DNSMOS ONNX models, PocketSphinx, ViSQOL's SVR),
  loaded once per process.
"""
