"""The two-model study behind analyze.py: presets (preset.py), each model's runs (stages.py), the pair stages that
read their caches (pair.py) and the summary figures (summary.py)."""
