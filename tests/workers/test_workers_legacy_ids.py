"""A legacy SSE session id in the query, on a worker that does not hold the stream (invariant 4).

A legacy session lives in the process that holds its ``GET /sse`` stream: its owner is known
only there. A message ``POST`` naming a session this process does not hold was refused (404,
"route a client to one worker"), but any other method was forwarded with the id as sent.
Hole found: key B, on a worker other than the one holding key A's stream, sent ``GET`` (or
``DELETE``) with ``?session_id=<A's id>``: where the stream lives that is 403, elsewhere it
went up, and a server that resumes or ends a legacy session by that parameter acted on A's.
The query form names only legacy sessions, so one this process does not hold is 404 whatever
the method. Two ``SessionTable``s are two workers.
"""

from __future__ import annotations

import pytest

from sidecar.core.errors import Forbidden, NoRoute
from sidecar.upstreams.mcp.sessions import SSE, SessionIds, SessionTable


@pytest.mark.parametrize("post", [True, False])
def test_a_query_id_another_worker_holds_is_never_forwarded(post: bool) -> None:
    holder, other = SessionTable(), SessionTable()
    holder.bind("mcp", SSE, "a-legacy-session", "key-a")
    ids = SessionIds(query="a-legacy-session")
    with pytest.raises(Forbidden):
        holder.resolve("mcp", "key-b", ids, post=post)  # where the stream lives: another key's
    with pytest.raises(NoRoute):
        other.resolve("mcp", "key-b", ids, post=post)  # elsewhere: not forwarded for the upstream to judge
    assert holder.resolve("mcp", "key-a", ids, post=post)[1] is not None  # the owner, where it lives
