"""What a capped claim may take, shared by both backends: the rooms the caller gave
(``Caps``) and the greedy pick in claim order (``Picker``). Each backend walks its claim
index with its own SQL and offers every row to a ``Picker``."""

from __future__ import annotations

import attrs


@attrs.frozen
class Caps:
    """A capped claim's rooms as the caller gave them; ``skip_hosts`` have none."""

    limit: int
    per_host: int | None
    host_room: dict[str, int]
    per_client: int | None
    client_room: dict[str, int]
    """Empty unless ``per_client`` is given."""


class Picker:
    """The greedy pick of a capped claim, in claim order: a job is taken unless its host
    or its client has no room left, until ``limit`` are taken. Never exceeds a room, and a
    host or client without room does not hold back the others' jobs."""

    __slots__ = ("client_default", "client_left", "host_default", "host_left", "limit", "picked")

    def __init__(
        self,
        limit: int,
        host_left: dict[str, int],
        host_default: int,
        client_left: dict[str, int],
        client_default: int | None,
    ) -> None:
        self.limit = limit
        self.host_left = host_left
        self.host_default = host_default
        self.client_left = client_left
        self.client_default = client_default
        """None: clients are not capped."""
        self.picked: list[int] = []

    def offer(self, seq: int, host: str, client: str) -> bool:
        """Take the job if its host and client have room; False if not."""
        hleft = self.host_left.get(host, self.host_default)
        cleft = self.client_left.get(client, self.client_default)
        if hleft <= 0 or (cleft is not None and cleft <= 0):
            return False
        self.picked.append(seq)
        self.host_left[host] = hleft - 1
        if cleft is not None:
            self.client_left[client] = cleft - 1
        return True

    @property
    def done(self) -> bool:
        return len(self.picked) >= self.limit

    def full_hosts(self) -> list[str]:
        return [h for h, n in self.host_left.items() if n <= 0]

    def full_clients(self) -> list[str]:
        return [c for c, n in self.client_left.items() if n <= 0]
