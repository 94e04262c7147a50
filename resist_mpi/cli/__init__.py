"""The command line (`python -m resist_mpi.train`): settings (`config`), the training loop on the
public strategy API (`trainer`), checkpoints (`checkpoint`), logs (`metrics`), stop signals
(`preempt`) and lost peers (`watchdog`)."""
