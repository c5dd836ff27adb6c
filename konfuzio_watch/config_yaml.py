"""Reading the config's YAML: ``yaml.safe_load`` that refuses a key given twice and aliases that
expand without bound, before anything is built from them."""

from __future__ import annotations

from typing import Any

import yaml

from .config_sections import ConfigError

# Values a config may hold once its aliases are expanded. A real config has a few hundred; a few
# hundred bytes of nested aliases (the YAML "billion laughs") expand to billions, which every walk
# over the value (validation, an error message's repr) would pay for in time and memory.
MAX_EXPANDED_NODES = 100_000


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused, and aliases that expand beyond
    MAX_EXPANDED_NODES or into themselves refused before anything is built from them."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Raise ``ConfigError`` naming the key whose value expands too far (or contains itself).
    Sizes are counted once per node (aliases share nodes), so this is linear in the text."""
    sizes: dict[int, int] = {}
    looped: list[yaml.Node] = []

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known == -1:  # an alias inside its own anchor's value: it expands without end
            looped.append(node)
            return MAX_EXPANDED_NODES + 1
        if known is not None:
            return known
        sizes[id(node)] = -1
        total = 1
        for child in _children(node):
            total = min(total + size(child), MAX_EXPANDED_NODES + 1)
        sizes[id(node)] = total
        return total

    def check(node: yaml.Node, key: str) -> None:
        if size(node) <= MAX_EXPANDED_NODES:
            return
        if isinstance(node, yaml.MappingNode):  # name the innermost key whose value is too large
            for key_node, value in node.value:
                name = f"{key}.{key_node.value}" if key else str(key_node.value)
                check(key_node, name)
                check(value, name)
        if looped:
            raise ConfigError(f"{key or 'config'}: a YAML alias refers to the value that contains it")
        raise ConfigError(
            f"{key or 'config'}: its YAML aliases expand to over {MAX_EXPANDED_NODES:,} values; write the value out"
        )

    check(root, "")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice (a second ``callback:`` section) is an
    error instead of silently replacing the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1}); merge the two",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line  # type: ignore[index]
        return super().construct_mapping(node, deep=deep)
