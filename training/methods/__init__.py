"""Training methods as plug-ins: one class per method over `training.methods.base.Method`."""
