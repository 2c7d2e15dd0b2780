/// One self-contained HTML page of every reproduction's tables and notes.
public enum HTMLReport {
    public static func page(_ sections: [(name: String, text: String)], skipped: [String]) -> String {
        func esc(_ s: String) -> String {
            s.replacing("&", with: "&amp;").replacing("<", with: "&lt;").replacing(">", with: "&gt;")
        }
        var out = """
            <!doctype html><html><head><meta charset="utf-8"><title>MemVirt reproductions</title>
            <style>body{font-family:system-ui,sans-serif;margin:2em;max-width:90em}pre{background:#f6f6f6;padding:1em;overflow-x:auto}
            nav a{margin-right:1em}</style></head><body><h1>MemVirt reproductions</h1><nav>
            """
        for s in sections { out += "<a href=\"#\(esc(s.name))\">\(esc(s.name))</a>" }
        out += "</nav>"
        for s in sections { out += "<h2 id=\"\(esc(s.name))\">\(esc(s.name))</h2><pre>\(esc(s.text))</pre>" }
        if !skipped.isEmpty { out += "<h2>Skipped</h2><ul>" + skipped.map { "<li>\(esc($0))</li>" }.joined() + "</ul>" }
        return out + "</body></html>\n"
    }
}
