"""The reference floor of bench/process_bench.py: the least work a plan of N users could be.

Run as a bare `python3 -S bench/floor.py USERS.json TRANSPORT DOMAIN` (no site packages, no
mailrec): read the users (the state, as JSON) and the lab's transport map, and compute the
set difference between who should be forwarded to the rental and who is. Any machine can
reproduce it; mailrec's figures are worth reading beside it.
"""

import json
import sys


def main() -> int:
    users_path, transport_path, domain = sys.argv[1:4]
    with open(users_path, encoding="utf-8") as handle:
        users = json.load(handle)
    wanted = {name for name, user in users.items() if user["inbound"] == "rental"}
    suffix = "@" + domain
    routed = set()
    with open(transport_path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#") or not line.strip():
                continue
            key = line.split(None, 1)[0]
            if key.endswith(suffix):
                routed.add(key[: -len(suffix)])
    print(f"{len(users)} users: {len(wanted - routed)} to forward, "
          f"{len(routed - wanted)} to bring back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
