"""Deployment: a TensorFlow SavedModel with the whole captioner inside (:mod:`.export`)."""
