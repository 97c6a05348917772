"""One way to cache: data derived from a mask or positions through ``derived`` (keyed by its builder), and one LRU with
one tensor-content key for the module-level caches (the compiled-op path's masks and positions, the models' masks)."""

import pytest
import torch

from zorro_kernels import RelativePositionBias, RelativePositions, ZorroMask, _ops
from zorro_kernels.caching import LRU, tensor_key


def test_tensor_key_is_the_content():
    a = torch.arange(4, dtype=torch.int32)
    assert tensor_key(a) == tensor_key(a.clone()) == tensor_key(torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    assert tensor_key(a.reshape(2, 2).t()) == tensor_key(a.reshape(2, 2).t().contiguous())  # strides do not matter
    assert tensor_key(None) is None
    # each field matters: the values, the shape (same bytes), the dtype (same bytes)
    assert tensor_key(a) != tensor_key(torch.tensor([0, 1, 2, 4], dtype=torch.int32))
    assert tensor_key(a) != tensor_key(a.reshape(2, 2))
    assert tensor_key(a) != tensor_key(a.view(torch.float32))
    assert tensor_key(torch.ones(3, dtype=torch.bfloat16)) != tensor_key(torch.ones(3, dtype=torch.float16))
    with pytest.raises(TypeError, match="tensor_key takes a torch.Tensor or None, got list"):
        tensor_key([1, 2])


def test_lru_forgets_the_least_recently_used():
    cache, built = LRU(2), []

    def build(x):
        built.append(x)
        return x * 10

    assert cache.get("a", lambda: build(1)) == 10 and cache.get("a", lambda: build(9)) == 10
    cache.get("b", lambda: build(2))
    cache.get("a", lambda: build(9))  # "a" is now the most recent: "b" goes first
    cache.get("c", lambda: build(3))
    assert "a" in cache and "b" not in cache and "c" in cache and len(cache) == 2
    cache.put("c", 30)
    cache.put("d", 40)  # "a" was used before "c" was put
    assert "a" not in cache and cache.get("c", lambda: build(9)) == 30
    assert built == [1, 2, 3]
    with pytest.raises(ValueError, match="max_entries must be a positive int, got 0"):
        LRU(0)


def test_derived_inputs_are_not_part_of_the_key():
    mask = ZorroMask.zorro(audio=3, video=4)

    def build(m, key, *, extra):
        return (key, extra)

    assert mask.derived(build, 1, extra="first") == (1, "first")
    assert mask.derived(build, 1, extra="second") == (1, "first")  # the key decides; inputs follow from it
    assert len([k for k in mask._cache if k[0] is build]) == 1


def test_tile_maps_are_derived_data_per_device():
    m = ZorroMask.zorro(audio=10, video=20, fusion=2)
    tm = m.tile_map(16, 16)
    assert m.tile_map(16, 16, torch.device("cpu")) is tm and m.token_meta("cpu") is m.token_meta()
    assert all(callable(k[0]) for k in m._cache)  # no string keys left


def test_model_mask_cache_keys_on_length_values():
    # a key that ignored the lengths' values was caught only through models shared between tests
    a, b = torch.tensor([[4, 6, 2]]), torch.tensor([[4, 5, 2]])
    cache = LRU(8)
    built = [
        cache.get(("self", (4, 6, 2), tensor_key(lens)), lambda lens=lens: ZorroMask.zorro(4, 6, 2, lengths=lens))
        for lens in (a, b, a.clone())
    ]
    assert built[0] is built[2] and built[1] is not built[0]
    assert built[1].lengths.tolist() == [[4, 5, 2]]


@pytest.mark.parametrize(
    "change",
    [
        dict(lengths=torch.tensor([[3, 2]])),
        dict(causal=True),
        dict(window=(1, 0)),
        dict(allow=torch.tensor([[True, False], [True, True]])),
        dict(segments=[("a", 4), ("b", 1)]),
    ],
    ids=lambda c: next(iter(c)),
)
def test_mask_content_key_sees_every_field(change):
    base = dict(segments=[("a", 3), ("b", 2)], allow=torch.ones(2, 2, dtype=torch.bool), lengths=torch.tensor([[3, 1]]))
    kw = {**base, **change}
    a = ZorroMask(base["segments"], base["allow"], lengths=base["lengths"])
    b = ZorroMask(kw.pop("segments"), kw.pop("allow"), **kw)
    assert a.key != b.key
    renamed = ZorroMask([("x", 3), ("y", 2)], base["allow"], lengths=base["lengths"].to(torch.int32))
    assert renamed.key == a.key  # names and the lengths' integer type are not content


def _positions():
    coords = torch.cartesian_prod(torch.arange(2), torch.arange(3))  # (6, 2)
    return RelativePositions(coords, coords, (2, 3))


def test_relative_positions_are_immutable():
    p = _positions()
    want = p.index(torch.arange(6), torch.arange(6))[0]
    with pytest.raises(AttributeError, match="RelativePositions is immutable .* cannot set 'q_coords'"):
        p.q_coords = torch.zeros(6, 2, dtype=torch.int64)
    p.q_coords.fill_(5)  # a copy: the positions (and what is cached on them) stay true
    p.extents.fill_(1)
    assert torch.equal(p.index(torch.arange(6), torch.arange(6))[0], want)
    assert p.step_index(((0, 6),), ((0, 6),)) is p.step_index(((0, 6),), ((0, 6),))


def test_positions_from_sets_equal_concat():
    a = _positions()
    none = torch.full((6, 1), -1)
    b = RelativePositions(none, none, (4,))
    joined = RelativePositions.concat([a, b])
    direct = RelativePositions(
        joined.q_coords, joined.k_coords, joined.extents, q_group=joined.q_group, k_group=joined.k_group
    )
    rows = torch.arange(6)
    for x, y in zip(joined.index(rows, rows), direct.index(rows, rows)):
        assert (x is None and y is None) or torch.equal(x, y)
    assert direct.table_size == joined.table_size == 3 * 5 + 7
    with pytest.raises(TypeError, match="q_group and k_group go together"):
        RelativePositions(joined.q_coords, joined.k_coords, joined.extents, q_group=joined.q_group)
    with pytest.raises(ValueError, match=r"q_group must hold position-set indices in \[-1, 1\] .* \[2, 2\]"):
        RelativePositions(
            joined.q_coords, joined.k_coords, joined.extents, q_group=joined.q_group + 2, k_group=joined.k_group
        )


def test_compiled_op_path_finds_positions_by_content():
    """The ops pass positions as tensors; a fresh positions object with the same content is the registered one, and
    positions rebuilt from the tensors (nothing registered) index the table the same way."""
    p = _positions()
    bias = RelativePositionBias(torch.randn(1, p.table_size), positions=p)
    args = _ops.describe_bias(bias)
    assert _ops._bias_from(*args).positions is p
    assert _ops.describe_bias(bias).pos_q is args.pos_q  # packed once, on the positions
    _ops._positions.clear()
    rebuilt = _ops._bias_from(*args).positions
    assert rebuilt is not p
    rows = torch.arange(6)
    assert torch.equal(rebuilt.index(rows, rows)[0], p.index(rows, rows)[0])
    moved = args._replace(pos_q=args.pos_q.flip(0))
    assert _ops._bias_from(*moved).positions is not rebuilt
