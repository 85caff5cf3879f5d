"""The math, as pure functions over tensors: the distillation objectives and their registry
(``objectives``), representation terms (``representation``, wired to the models by
``representation_term``), LGTM's distillation influence (``influence``) and MetaDistil's second-order
update (``meta_gradient``)."""
