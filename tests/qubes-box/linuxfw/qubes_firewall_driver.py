#!/usr/bin/env python3
"""Runs Qubes' own Linux sys-firewall rule translation for the box's
differential test (tests/linux_differential.rs).

Usage: qubes_firewall_driver.py QUBES_CORE_AGENT_LINUX_DIR

Imports `qubesagent.firewall` from the given unpacked
qubes-core-agent-linux tree (never copied into this project) with a
stand-in `qubesdb` module holding an in-memory database, creates the
`qubes-firewall` tables with `NftablesWorker.init()`, then serves commands
on stdin, one per line:

  set KEY<TAB>VALUE   an entry of the stand-in QubesDB
  clear               forget every entry
  apply ADDR...       NftablesWorker.handle_addr(ADDR) for each address (what
                      the daemon does on the commit write), then
                      update_connected_ips(4) and (6)

Each `apply` answers with the errors the worker logged, one per line as
`error MESSAGE`, then `done`.

Three things of the real daemon are replaced, none of them in the rule
translation: the DNS servers come from the command line environment
(QUBES_DNS, as sys-firewall's /etc/resolv.conf would list them); the user
notification of log_error only records the message; and when `conntrack`
is not installed, the list of live connections to cut is empty (every
probe of the test is a new flow).
"""
import os
import shutil
import sys
import types

entries = {}


class QubesDB:
    """The subset of qubesdb.QubesDB that qubesagent.firewall uses."""

    def read(self, path):
        value = entries.get(path)
        return None if value is None else value.encode()

    def multiread(self, prefix):
        return {k: v.encode() for k, v in entries.items() if k.startswith(prefix)}

    def list(self, prefix):
        return [k for k in entries if k.startswith(prefix)]

    def write(self, path, value):
        entries[path] = value.decode() if isinstance(value, bytes) else str(value)

    def rm(self, path):
        for key in [k for k in entries if k == path or (path.endswith('/') and k.startswith(path))]:
            del entries[key]

    def watch(self, path):
        pass

    def read_watch(self):
        return None


module = types.ModuleType('qubesdb')
module.QubesDB = QubesDB
sys.modules['qubesdb'] = module
sys.path.insert(0, sys.argv[1])
from qubesagent import firewall  # noqa: E402

errors = []
worker = firewall.NftablesWorker()
dns = os.environ.get('QUBES_DNS', '').split()
worker.dns_addresses = lambda family=None: iter(
    [a for a in dns if (family or 0) in (0, 6 if ':' in a else 4)])
worker.log_error = errors.append
if shutil.which('conntrack') is None:
    worker.conntrack_get_connections = lambda family, source: set()
worker.init()
print('ready', flush=True)

for line in sys.stdin:
    line = line.rstrip('\n')
    if line.startswith('set '):
        key, _, value = line[4:].partition('\t')
        entries[key] = value
    elif line == 'clear':
        entries.clear()
    elif line.startswith('apply'):
        errors.clear()
        try:
            for addr in line.split()[1:]:
                worker.handle_addr(addr)
            worker.update_connected_ips(4)
            worker.update_connected_ips(6)
        except Exception as e:  # the real daemon would stop here
            errors.append('daemon crashed: {!r}'.format(e))
        for error in errors:
            print('error ' + error.replace('\n', ' '), flush=True)
        print('done', flush=True)
    else:
        print('error unknown command ' + line, flush=True)
        print('done', flush=True)
