"""Running the model: the jitted forward passes, sampling and the bucketed generate engine."""
