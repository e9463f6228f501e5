"""The extractor library: a trained model of any family run over real recordings, files or
arrays, of any length and rate. inference.py is its command line; evaluate.py, evaluation/ and
bench/ use it too.

- extraction/extractor.py: ``Extractor`` (``run`` a file job, ``extract_array``,
  ``extract_chunked``), the reference cache, ``resolve_device``;
- extraction/reference.py: which part of a reference is used and which references are refused;
- extraction/windows.py: windows and cross-fades;
- extraction/pcs.py: perceptual contrast stretching, whole or streaming;
- extraction/streaming.py: ``StreamingExtractor``, a causal model hop by hop;
- extraction/onnx_runtime.py: ``OnnxModel``, a checkpoint's model whose network runs in ONNX
  Runtime from export_onnx.py's folder, which ``Extractor`` and ``StreamingExtractor`` take as
  they take the model (doc/onnx.md).

Inputs may have any sample rate and channel count: channels are averaged and the signal is
resampled with soxr to the model's rate (dsp/audio.py).

Long recordings run in bounded memory. The mixture is read block by block (never whole) and
resampled with a streaming soxr resampler; the model runs on windows of ``--window`` seconds
(default 8) that overlap by ``--overlap`` seconds (default 1); the last window is moved back to
end at the last sample, so it is full length and overlaps its neighbour by more. In each overlap
the two windows' estimates are cross-faded with a raised-cosine pair whose gains sum to one: the
two estimates of the same target are strongly correlated, so amplitude-complementary gains keep
the level constant where an equal-power fade would add up to +3 dB in the middle of the seam.
The reference is embedded once per file (the model's ``encode_reference``) and reused for every
window and every mixture that shares it; the embeddings of the ``REF_CACHE_SIZE`` most recently
used references are kept (about 81 MB each for 30 s at the recipe's width), so a ``--ref-dir``
run holds a bounded number of them however many references it meets.

Several references of the target (inference.py ``--ref`` given more than once) are encoded one by
one and pooled (``models.layers.conditioning.pool_references``: reference frames side by side,
pretrained speaker embeddings averaged); a longer enrolment tells the model more about the voice
than any one utterance.

References: the first ``MAX_REF_SECONDS`` of each are used; one shorter than
``MIN_REF_SECONDS`` or with no voice in it (``check_reference``: its loudest
``REF_FRAME_SECONDS`` frame below ``MIN_REF_PEAK_DBFS``) is refused, since the target cannot be
identified from it.

Level: a model divides its input by the input's RMS. Normalising each window by its own
RMS would change the gain from window to window, so a first streaming pass measures the RMS of
the whole (resampled) mixture and every window is divided and re-multiplied by that one scale
(the model's ``extract(..., scale=...)``). A recording that fits in one window is therefore
processed as the model's ``forward`` would process it (the scale is summed in float64, so it may
differ from the generator's float32 one in the last bit).

``Extractor.extract_array`` runs the same reference check and encoding, windows, cross-fades and
one scale per file on signals already in memory; evaluate.py scores checkpoints through it.

``pcs`` (inference.py ``--pcs``) post-processes every estimate with perceptual contrast stretching
(extraction/pcs.py, SEMamba's PCS400 moved to 48 kHz, without its peak normalisation). It runs at
the model rate on the assembled, cross-faded estimate as it streams out (before any resampling to
the mixture's own rate), with the result PCS of the whole file would give, in bounded memory. """
