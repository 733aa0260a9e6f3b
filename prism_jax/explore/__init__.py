"""Prototype explorer: labels, taxonomy, 2-D map and a self-contained HTML report."""
