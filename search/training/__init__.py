"""Training one model: the run's lifecycle, the fit and its Keras callbacks, resumable state."""
