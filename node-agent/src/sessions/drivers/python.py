# Kowalski Exo session driver for Python: runs the cells the node agent sends over the channel
# (a socket at the descriptor given as the first argument) in one namespace, like a notebook,
# and relays llm_query calls to the agent over the same channel.
#
# Frames, both ways: a header line "KIND ID LENGTH\n", then LENGTH bytes of payload.
#   agent -> driver: "exec" (the cell's code), "result" (JSON answer to an "llm" frame)
#   driver -> agent: "ready" (JSON), "done" (JSON outcome of a cell), "llm" (JSON prompts)
import ast
import builtins
import itertools
import json
import queue
import signal
import socket
import sys
import threading
import traceback

MAX_FRAME = int(sys.argv[2])


class Channel:
    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        self.reader = self.sock.makefile("rb")
        self.write_lock = threading.Lock()
        self.cells = queue.Queue()
        self.pending = {}
        self.pending_lock = threading.Lock()
        self.ids = itertools.count(1)
        self.closed = False

    def send(self, kind, frame_id, payload):
        with self.write_lock:
            self.sock.sendall(b"%s %d %d\n" % (kind.encode(), frame_id, len(payload)) + payload)

    def read_frames(self):
        while True:
            header = self.reader.readline()
            if not header:
                break
            kind, frame_id, length = header.split()
            payload = self.reader.read(int(length))
            if kind == b"exec":
                self.cells.put((int(frame_id), payload))
            elif kind == b"result":
                with self.pending_lock:
                    slot = self.pending.get(int(frame_id))
                if slot is not None:
                    slot[1] = payload
                    slot[0].set()
        self.closed = True
        self.cells.put(None)
        with self.pending_lock:
            for slot in self.pending.values():
                slot[0].set()

    def ask(self, request, kind="llm"):
        payload = json.dumps(request).encode()
        if len(payload) > MAX_FRAME:
            raise ValueError(
                "llm_query: the prompts take %d bytes, over the session's limit of %d"
                % (len(payload), MAX_FRAME)
            )
        frame_id = next(self.ids)
        slot = [threading.Event(), None]
        with self.pending_lock:
            self.pending[frame_id] = slot
        try:
            self.send(kind, frame_id, payload)
            slot[0].wait()
        finally:
            with self.pending_lock:
                self.pending.pop(frame_id, None)
        if slot[1] is None:
            raise RuntimeError("llm_query: the node agent closed the session's channel")
        answer = json.loads(slot[1])
        if "error" in answer:
            raise RuntimeError("llm_query: " + answer["error"])
        return [r["text"] if "text" in r else "Error: " + r["error"] for r in answer["results"]]


def llm_functions(channel):
    def llm_query(prompt, model=None, **options):
        """Asks a model of the cluster; returns its answer, or "Error: ..." when it failed."""
        return channel.ask({"prompts": [str(prompt)], "model": model or "", "options": options})[0]

    def llm_query_batched(prompts, model=None, **options):
        """Asks a model of the cluster every prompt at once; returns the answers in order."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            return []
        return channel.ask({"prompts": prompts, "model": model or "", "options": options})

    def context_text(context):
        if context is None:
            return ""
        return context if isinstance(context, str) else json.dumps(context)

    def rlm_query(prompt, context=None, model=None):
        """Starts a child Recursive Language Model run on the cluster, with its own session,
        over `context`; returns its final answer. At the run's depth limit it asks as
        llm_query does."""
        request = {"prompts": [str(prompt)], "contexts": [context_text(context)], "model": model or ""}
        return channel.ask(request, "rlm")[0]

    def rlm_query_batched(prompts, contexts=None, model=None):
        """Starts a child run per prompt, all at once over the cluster; answers in order."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            return []
        contexts = [context_text(c) for c in (contexts or [None] * len(prompts))]
        if len(contexts) != len(prompts):
            raise ValueError("rlm_query_batched: give one context per prompt")
        return channel.ask({"prompts": prompts, "contexts": contexts, "model": model or ""}, "rlm")

    return llm_query, llm_query_batched, rlm_query, rlm_query_batched


in_cell = False
DRIVER_FILE = sys._getframe().f_code.co_filename


def on_interrupt(signum, frame):
    if in_cell:
        raise KeyboardInterrupt


def print_exception(error):
    # The driver's own frames are left out: the traceback is the cell's.
    report = traceback.TracebackException(type(error), error, error.__traceback__)
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if frame.filename != DRIVER_FILE]
    )
    sys.stderr.write("".join(report.format()))


def run_cell(namespace, number, code):
    global in_cell
    name = "<cell %d>" % number
    try:
        tree = ast.parse(code, filename=name, mode="exec")
    except SyntaxError as error:
        print_exception(error)
        return {"status": "error", "error": "SyntaxError: %s" % error.msg}
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    in_cell = True
    try:
        exec(compile(tree, name, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, name, "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                print(repr(value))
        return {"status": "ok"}
    except KeyboardInterrupt as error:
        in_cell = False
        print_exception(error)
        return {"status": "interrupted"}
    except SystemExit as error:
        in_cell = False
        code = error.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        return {"status": "exit", "exit_code": code}
    except BaseException as error:
        in_cell = False
        print_exception(error)
        return {"status": "error", "error": "%s: %s" % (type(error).__name__, error)}
    finally:
        in_cell = False
        sys.stdout.flush()
        sys.stderr.flush()


def main():
    channel = Channel(int(sys.argv[1]))
    llm_query, llm_query_batched, rlm_query, rlm_query_batched = llm_functions(channel)
    namespace = {
        "__name__": "__main__",
        "__builtins__": builtins,
        "llm_query": llm_query,
        "llm_query_batched": llm_query_batched,
        "rlm_query": rlm_query,
        "rlm_query_batched": rlm_query_batched,
    }
    signal.signal(signal.SIGINT, on_interrupt)
    sys.argv = [""]
    threading.Thread(target=channel.read_frames, daemon=True).start()
    version = "%d.%d.%d" % sys.version_info[:3]
    channel.send("ready", 0, json.dumps({"version": version}).encode())
    number = 0
    while True:
        cell = channel.cells.get()
        if cell is None:
            return
        frame_id, code = cell
        number += 1
        try:
            outcome = run_cell(namespace, number, code.decode("utf-8", "replace"))
        except KeyboardInterrupt:
            # A repeated interrupt that landed while the cell was already ending.
            outcome = {"status": "interrupted"}
        channel.send("done", frame_id, json.dumps(outcome).encode())


main()
