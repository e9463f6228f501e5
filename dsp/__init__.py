"""The signal layer every other package stands on: audio I/O and resampling, the STFT, atomic
file writing, float32 islands under autocast and the level a model normalises by. It imports no
other package of the repository."""
