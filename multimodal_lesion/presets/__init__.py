"""Preset experiment configs shipped with the package: ``load_config("real_frozen")``, ``--config real_frozen``.

Each ``NAME.toml`` here is a short list of overrides of the typed defaults (``config.py``) with a
comment on why; :func:`multimodal_lesion.config.list_presets` names them.
"""
