"""Answer policy questions with Qubes' own Python policy parser.

Part of the project's differential test (`tests/differential.rs`); this file
is ours. It imports qubes-core-qrexec's `qrexec.policy.parser` from the
directory given as the first argument (the test unpacks the reference
tarball there) and never copies any of it.

Standard input: one JSON list of worlds, each
  {"policy_dirs": [DIR, ...], "legacy_dir": DIR, "system": {NAME: {...}, ...},
   "requests": [{"source", "target", "service", "mode"}, ...]}
with mode "normal" (an `ask` is reported with its choices, not answered),
"assume_yes" (answered with the requested target, as
`qrexec-policy-exec --assume-yes-for-ask`) or "just_evaluate".

Standard output: one JSON list with, per world, either
  {"load_error": TEXT}  or  {"answers": [ANSWER, ...]}
where ANSWER is one of
  {"result": "allow", "reply": {KEY: VALUE, ...}}   (the reply lines)
  {"result": "ask", "targets": [...], "default": TARGET or null}
  {"result": "deny", "notify": BOOL, "why": TEXT}
  {"result": "error", "why": TEXT}     (an exception: Qubes refuses the call)
"""

import json
import logging
import pathlib
import sys


def main():
    sys.path.insert(0, sys.argv[1])
    # pylint: disable=import-outside-toplevel
    from qrexec import exc
    from qrexec.policy import parser, parser_compat

    logging.disable(logging.CRITICAL)

    def run(coroutine):
        """Run a coroutine that never really waits."""
        try:
            coroutine.send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("resolution awaited something")

    class RecordAsk(parser.AskResolution):
        async def execute(self):
            return {
                "result": "ask",
                "targets": sorted(str(t) for t in self.targets_for_ask),
                "default": (
                    None if self.default_target is None
                    else str(self.default_target)
                ),
            }

    class AssumeYes(parser.AskResolution):
        async def execute(self):
            return await self.handle_user_response(
                True, self.request.target
            ).execute()

    class JustAllow(parser.AllowResolution):
        async def execute(self):
            return "result=allow"

    class JustAsk(parser.AskResolution):
        async def execute(self):
            return "result=deny"

    kinds = {
        "normal": (parser.AllowResolution, RecordAsk),
        "assume_yes": (parser.AllowResolution, AssumeYes),
        "just_evaluate": (JustAllow, JustAsk),
    }

    def system_info(domains):
        info = {}
        for name, domain in domains.items():
            entry = {
                "tags": list(domain.get("tags", [])),
                "type": domain["type"],
                "template_for_dispvms": domain.get(
                    "template_for_dispvms", False
                ),
                "default_dispvm": domain.get("default_dispvm"),
                "power_state": domain.get("power_state", "Halted"),
                "icon": "appvm-red",
                "label": "red",
                "guivm": None,
                "internal": domain.get("internal", False),
                "name": name,
            }
            if domain.get("uuid") is not None:
                entry["uuid"] = domain["uuid"]
            info[name] = entry
        # as qrexec.utils.get_system_info() does: each qube also by uuid
        for entry in list(info.values()):
            if "uuid" in entry:
                info["uuid:" + entry["uuid"]] = entry
        return {"domains": info}

    def answer(policy, info, request):
        allow_type, ask_type = kinds[request["mode"]]
        service_and_arg = request["service"]
        if "+" in service_and_arg:
            i = service_and_arg.index("+")
            service, argument = service_and_arg[:i], service_and_arg[i:]
        else:
            service, argument = service_and_arg, "+"
        try:
            req = parser.Request(
                service,
                argument,
                request["source"],
                request["target"],
                system_info=info,
                allow_resolution_type=allow_type,
                ask_resolution_type=ask_type,
            )
            out = run(policy.evaluate(req).execute())
        except exc.PolicySyntaxError as err:
            return {"result": "deny", "notify": False, "why": str(err)}
        except exc.AccessDenied as err:
            return {"result": "deny", "notify": err.notify, "why": str(err)}
        except Exception as err:  # pylint: disable=broad-except
            return {"result": "error", "why": repr(err)}
        if isinstance(out, dict):
            return out
        reply = dict(line.split("=", 1) for line in out.split("\n"))
        if reply.get("result") == "allow":
            return {"result": "allow", "reply": reply}
        return {"result": "deny", "notify": None, "why": out}

    worlds = json.load(sys.stdin)
    results = []
    for world in worlds:
        parser_compat.POLICYPATH_OLD = pathlib.Path(world["legacy_dir"])
        info = system_info(world["system"])
        try:
            policy = parser.FilePolicy(
                policy_path=[pathlib.Path(d) for d in world["policy_dirs"]]
            )
        except exc.AccessDenied as err:
            results.append({"load_error": str(err)})
            continue
        except Exception as err:  # pylint: disable=broad-except
            results.append({"load_error": "exception: " + repr(err)})
            continue
        results.append(
            {"answers": [answer(policy, info, r) for r in world["requests"]]}
        )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
