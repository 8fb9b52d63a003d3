"""The model and its training, with nothing of tracking or sweeps: config schema, data, model, the loop, the machine.

Imports only fashioncnn.core (and torch, Hydra's config store, OmegaConf). Everything else imports it.
"""
