"""docker-compose.yml -> a copy that runs where Docker Hub and GPUs are not: local stand-ins for the two
Hub images (Postgres from Debian packages; the satdet CPU image, which has the pinned Prefect, as the
server), no GPU reservation, no top-level name and short-syntax binds (so Debian's compose v1 runs it too).
Everything the smoke test checks (ports, the server's start guard, auth, users, volumes, healthchecks,
the trainer's command) is kept as it is. Usage: derive.py SRC DST SATDET_IMAGE POSTGRES_IMAGE"""
import sys

import yaml

src, dst, image, postgres = sys.argv[1:5]
with open(src) as f:
    compose = yaml.safe_load(f)
compose.pop("name", None)
services = compose["services"]
services["postgres"]["image"] = postgres
services["prefect-server"]["image"] = image
services["prefect-server"]["entrypoint"] = []  # the command is `sh -c ...`, not a satdet subcommand
trainer = services["trainer"]
trainer["image"] = image
trainer.pop("build", None)
trainer.pop("deploy", None)
trainer["volumes"] = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in trainer["volumes"]]
with open(dst, "w") as f:
    yaml.safe_dump(compose, f, sort_keys=False)
