"""The command line and the local services: the composition root, the one layer that may import every other
(schemas -> recstream core -> edges: streams, batch -> agents -> serving -> cli; docs/architecture.md)."""
