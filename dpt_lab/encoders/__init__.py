"""Family-specific encoders; each returns encoders.base.EncoderFeatures."""
