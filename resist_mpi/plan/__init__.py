"""Planning, pure: no communication, no torch state. Who trains which block each round
(`partition`), who sends which block to whom (`routing`), and how ranks form groups (`groups`)."""
