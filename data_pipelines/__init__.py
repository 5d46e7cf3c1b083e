"""Input pipelines for NYUD-v2 and PASCAL-Context (multi-task layouts); independent of any model."""
