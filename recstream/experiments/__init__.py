"""A/B experiments (pure core): versioned definitions, stable assignment, and the statistics that decide promotion."""
