"""Inspection of routed graphs: tables, diffs, drawings, routing heat maps."""
