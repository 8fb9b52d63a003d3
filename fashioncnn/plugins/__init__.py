"""Hydra plugins of fashioncnn, installed as the package `hydra_plugins.fashioncnn_plugins` (Hydra loads plugins from there)."""
