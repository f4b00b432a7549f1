"""A method plugin as an installed package would ship it: importing the module registers a method
(``test_methods`` points a fake ``hdml_jax.methods`` entry point here)."""

from hdml_jax import methods
from hdml_jax.methods import Method, proxy

PLUGIN_METHOD = methods.register(
    Method(
        name="plugin_proxy_anchor",
        summary="Proxy-Anchor, from a plugin",
        loss="proxy_anchor_loss",
        form="proxy",
        recipe=proxy.proxy_anchor_recipe,
        keywords=proxy.proxy_anchor_keywords,
        fields=proxy.PROXY_ANCHOR_FIELDS,
    )
)
