"""emoji-world: data, training and evaluation of keylocked's embedded ``emoji-64`` model.

Modules: ``catalog`` (curated emoji concepts, held-out splits), ``render`` (sprites in two art
styles), ``compose`` (pure caption/composition logic), ``build_dataset``, ``train_vae``,
``train_unet``, ``export`` (writes ``keylocked/models/emoji-64``) and ``evaluate_base``.
"""
