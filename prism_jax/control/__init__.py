"""Linear prototype controllers and targeted prototype suppression (docs/control_explore.md)."""
