"""The math, as pure functions over tensors: the distillation objectives and their registry
(``objectives``), the same token-level losses computed a chunk of positions at a time (``chunked``) or from a
top-k teacher cache (``sparse``), representation terms (``representation``, wired to the models by
``representation_term``), LGTM's distillation influence (``influence``) and MetaDistil's second-order update
(``meta_gradient``)."""
