"""Guards that turn a silent fault into a clear error: non-finite losses, gradients and weights
(``nonfinite``), argument checks (``validation``), secrets kept out of saved arguments (``redaction``), file
checksums (``checksums``) and whole verified checkpoints (``checkpoints``), resumes with changed arguments
(``resume_changes``), one run per output folder (``run_lock``), and a classifier that collapsed to one class
(``collapse``)."""
