"""The configuration: the schema, composing and validating it into a ``Job``, model specs, the reference page."""
