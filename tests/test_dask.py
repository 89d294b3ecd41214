"""dask.array, a lazy array-API library: a step builds graph and computes nothing (a value read
on the host, ``float(norm)``, computed every step before it, at every step), and a rule that
needs what dask's namespace lacks is refused at set-up."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import uniopt as uo

da = pytest.importorskip("dask.array")
callbacks = pytest.importorskip("dask.callbacks")


class _Computes(callbacks.Callback):  # type: ignore[misc,name-defined]
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def _start(self, dsk: Any) -> None:
        self.count += 1


@pytest.mark.parametrize("rule", [
    uo.chain(uo.clip_by_global_norm(1.0), uo.adam(lr=0.1)),
    uo.chain(uo.clip_by_norm(0.5), uo.sgd(lr=0.1, momentum=0.9)),
    uo.lamb(lr=0.01),
], ids=["clip_by_global_norm", "clip_by_norm", "lamb"])
def test_a_norm_stays_in_the_graph(rule: Any) -> None:
    """The global norm was read to the host (``float(total)``): dask computed the params'
    whole history at every step, each slower than the last (2.2 s at step 40 of a 64 x 64
    clip_by_global_norm + Adam, 15 ms at step 1). It is now the graph's, as under jax.jit;
    the numbers NumPy's (to the chunks' order of summing)."""
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((64, 48)), "b": rng.standard_normal(48)}
    pn, pd = dict(p0), {k: da.from_array(v, chunks=16) for k, v in p0.items()}
    sn, sd = uo.setup(rule, pn), uo.setup(rule, pd)
    with _Computes() as seen:
        for _ in range(6):
            g = {k: 3 * rng.standard_normal(v.shape) for k, v in p0.items()}
            sn, pn = uo.update(sn, pn, g)
            sd, pd = uo.update(sd, pd, {k: da.from_array(v, chunks=16) for k, v in g.items()})
    assert seen.count == 0
    for k in p0:
        np.testing.assert_allclose(np.asarray(pd[k]), pn[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: uo.soap(lr=0.01), lambda: uo.shampoo(lr=0.1)],
                         ids=["soap", "shampoo"])
def test_a_rule_that_calls_linalg_dask_lacks_is_refused_at_setup(make: Any) -> None:
    """SOAP's and Shampoo's eigh is in the array API's optional linalg extension, which dask's
    namespace does not have: set-up took the params and the first step raised "module
    'array_api_compat.dask.array.linalg' has no attribute 'eigh'" from inside the rule."""
    rule = make()
    with pytest.raises(TypeError, match=rf"^setup: {rule.name} calls the array API's "
                                        r"linalg\.eigh, which dask's namespace does not have; "
                                        r"params\['w'\] comes from it$"):
        uo.setup(rule, {"w": da.ones((4, 4), chunks=2)})


@pytest.mark.parametrize("make", [
    lambda: uo.chain(uo.scale_by_soap(), uo.scale(-0.01)),
    lambda: uo.partition({"a": uo.sgd(lr=0.1), "b": uo.shampoo(lr=0.1)},
                         lambda path, leaf: "b"),
    lambda: uo.chain(uo.scale_by_shampoo(), uo.scale(-0.1))],
    ids=["scale_by_soap", "partition-shampoo", "scale_by_shampoo"])
def test_a_part_that_calls_linalg_dask_lacks_is_refused_in_any_chain(make: Any) -> None:
    """A bare part (scale_by_soap in a chain by hand) or a rule inside a combinator that calls
    eigh or svd: only a registry rule at the top was refused, the others raised "module
    'array_api_compat.dask.array.linalg' has no attribute 'eigh'" from inside the part."""
    with pytest.raises(TypeError, match=r"^setup: (scale_by_soap|shampoo|scale_by_shampoo) "
                                        r"calls the array API's linalg\.eigh, which dask's "
                                        r"namespace does not have; params\['w'\] comes from it$"):
        uo.setup(make(), {"w": da.ones((4, 4), chunks=2)})


def test_a_checkpoint_of_a_lazy_state_computes_its_history_once(tmp_path: Any) -> None:
    """``uo.save`` of a dask state read each array apart, and each computed the whole history
    of steps it shares with the others (the slots and params of one Adam, 6 arrays: 6
    computes). One compute now, and the file loads to NumPy's run."""
    rng = np.random.default_rng(1)
    p0 = {"w": rng.standard_normal((32, 16)), "b": rng.standard_normal(16)}
    pn, pd = dict(p0), {k: da.from_array(v, chunks=8) for k, v in p0.items()}
    rule = uo.adam(lr=0.1)
    sn, sd = uo.setup(rule, pn), uo.setup(rule, pd)
    for _ in range(4):
        g = {k: rng.standard_normal(v.shape) for k, v in p0.items()}
        sn, pn = uo.update(sn, pn, g)
        sd, pd = uo.update(sd, pd, {k: da.from_array(v, chunks=8) for k, v in g.items()})
    path = str(tmp_path / "lazy.safetensors")
    with _Computes() as seen:
        uo.save(path, sd, params=pd)
    assert seen.count == 1
    back, p = uo.load(path, like=pn, params=True)
    for k in p0:
        np.testing.assert_allclose(p[k], pn[k], rtol=1e-12, atol=1e-14)
    for key in sn.slots:
        for x, y in zip(back.slots[key], sn.slots[key], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
