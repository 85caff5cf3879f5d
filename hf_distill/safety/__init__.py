"""Guards that turn a silent fault into a clear error: non-finite losses and weights (``nonfinite``),
argument checks (``validation``), secrets kept out of saved arguments (``redaction``), checkpoint
checksums (``checksums``), and a classifier that collapsed to one class (``collapse``)."""
