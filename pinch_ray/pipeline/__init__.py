"""The Ray pipeline: the Train worker and driver, the Tune sweep, the run directory, finalize and
reports, and the stage runner. Importing this package alone is cheap (the CLI reads :data:`STAGES`)."""

STAGES = ("prepare", "baseline", "compress", "finalize")  # the stages of a pipeline run, in order
