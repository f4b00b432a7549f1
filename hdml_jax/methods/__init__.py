"""The training methods, each declared once as a ``Method`` record (``hdml_jax.methods.registry``).

Built in: the proxy methods (``proxy``: Proxy-Anchor, Proxy-NCA, HPL around each, ProxyNCA++),
HIER around Proxy-Anchor (``hier``), Hyp (``hyp``),
CGD (``cgd``) and the comparison methods of HPL's tables (``baselines``: pytorch-metric-learning's
pair and classification losses with MLRC's hyper-parameters). A new method is one
``register(Method(...))``; every part of the trainer asks its record.
"""

from hdml_jax.methods import baselines, cgd, hier, hyp, proxy
from hdml_jax.methods.registry import (
    LossParameter,
    Method,
    find,
    get,
    loss_parameter_names,
    method_specific_fields,
    names,
    of,
    register,
    registered,
    unregister,
    users_of,
)

# The built-in methods, in the order of --help and the method table.
BUILT_IN = (
    proxy.PROXY_ANCHOR,
    proxy.PROXY_NCA,
    proxy.PROXY_NCA_PP,
    proxy.HPL_PA,
    proxy.HPL_NCA,
    hier.HIER_PA,
    hier.HPL_HIER_PA,
    hyp.HYP,
    cgd.CGD,
    *baselines.RECORDS,
)
for _method in BUILT_IN:
    register(_method)

__all__ = [
    "BUILT_IN",
    "LossParameter",
    "Method",
    "find",
    "get",
    "loss_parameter_names",
    "method_specific_fields",
    "names",
    "of",
    "register",
    "registered",
    "unregister",
    "users_of",
]
