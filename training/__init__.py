"""The training helpers train.py's loop is made of: the nets and their building, the schedules,
the loss assembly, the step log, the training state and its checkpoints, DDP sync and the
weights fingerprint, validation. None of them imports train.py."""
