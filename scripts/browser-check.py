#!/usr/bin/env python3
"""Loads an HTML report in headless Chromium over the DevTools protocol (--remote-debugging-pipe)
and prints one JSON object: console errors and uncaught exceptions, each chart's size, its drawn
area (the bounding box of its plot group) and number of drawn marks, and the screenshots saved.

usage: browser-check.py REPORT.html OUT_DIR
Exit 0 when it could run the browser (the caller judges the result), 2 when it could not.
"""
import base64, json, os, select, shutil, subprocess, sys, tempfile, time

def fail(msg):
    print(json.dumps({"error": msg}))
    sys.exit(2)

def main():
    if len(sys.argv) != 3:
        fail("usage: browser-check.py REPORT.html OUT_DIR")
    html, out_dir = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    if not os.path.isfile(html):
        fail(f"{html}: no such file")
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if not browser:
        fail("no chromium on PATH (scripts/install-deps installs Debian's chromium)")
    os.makedirs(out_dir, exist_ok=True)
    to_r, to_w = os.pipe()      # we write commands; chromium reads fd 3
    from_r, from_w = os.pipe()  # chromium writes fd 4; we read
    hi_in, hi_out = os.dup(to_r), os.dup(from_w)
    def child():
        os.dup2(hi_in, 3)
        os.dup2(hi_out, 4)
    profile = tempfile.mkdtemp(prefix="memvirt-chromium-")
    args = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
            "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank"]
    proc = subprocess.Popen(args, preexec_fn=child, close_fds=False, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for fd in (to_r, from_w, hi_in, hi_out):
        os.close(fd)
    buf = b""
    next_id = [0]
    events = []
    deadline = time.time() + 90

    def read_message():
        nonlocal buf
        while b"\0" not in buf:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("chromium did not answer within 90 s")
            r, _, _ = select.select([from_r], [], [], left)
            if not r:
                continue
            chunk = os.read(from_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the pipe: " + proc.stderr.read().decode(errors="replace")[-2000:])
            buf += chunk
        msg, buf = buf.split(b"\0", 1)
        return json.loads(msg)

    def send(method, params=None, session=None):
        next_id[0] += 1
        m = {"id": next_id[0], "method": method, "params": params or {}}
        if session:
            m["sessionId"] = session
        os.write(to_w, json.dumps(m).encode() + b"\0")
        while True:
            r = read_message()
            if r.get("id") == next_id[0]:
                if "error" in r:
                    raise RuntimeError(f"{method}: {r['error']}")
                return r.get("result", {})
            events.append(r)

    def wait_event(name):
        for i, e in enumerate(events):
            if e.get("method") == name:
                return events.pop(i)
        while True:
            e = read_message()
            if e.get("method") == name:
                return e
            events.append(e)

    try:
        targets = send("Target.getTargets")["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        tid = page["targetId"] if page else send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = send("Target.attachToTarget", {"targetId": tid, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            send(domain + ".enable", session=sid)
        send("Page.navigate", {"url": "file://" + html}, session=sid)
        wait_event("Page.loadEventFired")
        time.sleep(0.5)
        probe = """JSON.stringify(Array.from(document.querySelectorAll('svg.chart')).map(s => {
            const r = s.getBoundingClientRect(); const p = s.querySelector('g.plot');
            const b = p ? p.getBBox() : {width: 0, height: 0};
            return {id: s.closest('figure') ? s.closest('figure').id : '', width: r.width, height: r.height,
                    plot_width: b.width, plot_height: b.height, marks: s.querySelectorAll('.mark').length}; }))"""
        charts = json.loads(send("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=sid)["result"]["value"])
        sections = send("Runtime.evaluate", {"expression": "document.querySelectorAll('section').length", "returnByValue": True}, session=sid)["result"]["value"]
        shots = {}
        top = send("Page.captureScreenshot", {"format": "png"}, session=sid)
        shots["top"] = os.path.join(out_dir, "report-top.png")
        with open(shots["top"], "wb") as f:
            f.write(base64.b64decode(top["data"]))
        metrics = send("Page.getLayoutMetrics", session=sid)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        full = send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 30000), "scale": 1}}, session=sid)
        shots["full"] = os.path.join(out_dir, "report-full.png")
        with open(shots["full"], "wb") as f:
            f.write(base64.b64decode(full["data"]))
        # One screenshot per section (id), for people to look at without scrolling a long page.
        rects = json.loads(send("Runtime.evaluate", {"expression": """JSON.stringify(Array.from(document.querySelectorAll('section')).map(s => {
            const r = s.getBoundingClientRect(); return {id: s.id, x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height}; }))""",
            "returnByValue": True}, session=sid)["result"]["value"])
        for r in rects:
            if r["width"] <= 0 or r["height"] <= 0:
                continue
            shot = send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                        "clip": {"x": r["x"], "y": r["y"], "width": r["width"], "height": min(r["height"], 8000), "scale": 1}}, session=sid)
            path = os.path.join(out_dir, "report-section-" + (r["id"] or "unnamed") + ".png")
            with open(path, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            shots.setdefault("sections", []).append(path)
        # Errors: console.error/assert calls, uncaught exceptions, and log entries at error
        # level (failed loads, blocked resources, parse errors).
        errors = []
        for e in events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                errors.append("exception: " + p.get("exceptionDetails", {}).get("text", ""))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append("log: " + p["entry"].get("text", ""))
        print(json.dumps({"browser": browser, "url": "file://" + html, "console_errors": errors, "sections": sections,
                          "charts": charts, "screenshots": shots, "page_height": size["height"]}))
        try:
            send("Browser.close")
        except Exception:
            pass
    except Exception as ex:
        fail(f"{type(ex).__name__}: {ex}")
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)

main()
