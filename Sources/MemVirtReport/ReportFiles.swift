import Foundation
import MemVirtCore

/// CSV (RFC 4180) for tables, and writing a report folder: report.html plus
/// `<section id>/<table>.csv` for every table.
public enum CSV {
    /// One field: quoted when it holds a comma, a quote, CR or LF; quotes doubled.
    public static func field(_ s: String) -> String {
        if s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" || $0 == "\r\n" }) {
            return "\"" + s.replacing("\"", with: "\"\"") + "\""
        }
        return s
    }

    /// A cell as a number a spreadsheet reads: "1,234,567" becomes "1234567"; other cells stay.
    static func plain(_ cell: String) -> String {
        if cell.wholeMatch(of: /[+-]?\d{1,3}(,\d{3})+(\.\d+)?/) != nil { return cell.replacing(",", with: "") }
        return cell
    }

    /// The table as CSV: the header, then the rows; CRLF line ends.
    public static func table(_ t: TextTable) -> String {
        var out = t.header.map(field).joined(separator: ",") + "\r\n"
        for r in t.rows {
            var cells = r.map { field(plain($0)) }
            // Short rows padded so every record has the header's field count.
            if cells.count < t.header.count { cells += Array(repeating: "", count: t.header.count - cells.count) }
            out += cells.joined(separator: ",") + "\r\n"
        }
        return out
    }
}

public enum ReportFiles {
    /// The CSV file name of table `index`: its title as a slug (or "table-N"), made unique.
    public static func csvName(_ t: TextTable, index: Int, in tables: [TextTable]) -> String {
        func base(_ i: Int) -> String {
            guard let title = tables[i].title, !title.isEmpty else { return "table-\(i + 1)" }
            return String(slug(title).prefix(60)).trimmingCharacters(in: CharacterSet(charactersIn: "-"))
        }
        let b = base(index)
        let earlier = (0..<index).filter { base($0) == b }.count
        return (earlier > 0 ? "\(b)-\(earlier + 1)" : b) + ".csv"
    }

    /// Writes `dir/report.html` and `dir/<id>/<table>.csv`; returns the files written.
    @discardableResult
    public static func write(_ sections: [ReportSection], skipped: [String], to dir: String, footer: String = "") throws -> [String] {
        let fm = FileManager.default
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var written: [String] = []
        for s in sections where !s.tables.isEmpty {
            let sub = dir + "/" + s.id
            try fm.createDirectory(atPath: sub, withIntermediateDirectories: true)
            for (i, t) in s.tables.enumerated() {
                let path = sub + "/" + csvName(t, index: i, in: s.tables)
                try CSV.table(t).write(toFile: path, atomically: true, encoding: .utf8)
                written.append(path)
            }
        }
        let html = dir + "/report.html"
        try HTMLReport.page(sections, skipped: skipped, csvLinks: true, footer: footer).write(toFile: html, atomically: true, encoding: .utf8)
        written.append(html)
        return written
    }
}

/// Reads saved reports for `memvirt report`: report.json files, folders holding one, and
/// (through `directoryReaders`) other result folders, such as a sweep's.
public struct ReportLoader {
    /// Turns a folder without a report.json into sections; nil when the folder is not its
    /// kind. The extension point for sweep results: a sweep's folder holds one JSON per point,
    /// and a reader for it returns the sweep's `[Figure]` and tables as a `ReportSection`.
    public typealias DirectoryReader = @Sendable (String) throws -> [ReportSection]?

    public var directoryReaders: [DirectoryReader]
    /// Figures and headline for reproduction objects saved before reports carried them.
    public var derive: ((String, JSONValue) -> ([Figure], Headline?))?

    public init(directoryReaders: [DirectoryReader] = [], derive: ((String, JSONValue) -> ([Figure], Headline?))? = nil) {
        self.directoryReaders = directoryReaders
        self.derive = derive
    }

    public struct Result {
        public var sections: [ReportSection] = []
        public var skipped: [String] = []
        /// Inputs that could not be read, each naming the file and what is wrong.
        public var errors: [String] = []
        /// Parts left out of inputs that were otherwise read.
        public var warnings: [String] = []
    }

    public func load(_ paths: [String]) -> Result {
        var r = Result()
        for p in paths { load(p, into: &r) }
        return r
    }

    func load(_ path: String, into r: inout Result) {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            r.errors.append("\(path): no such file or folder")
            return
        }
        if isDir.boolValue {
            let inner = path + "/report.json"
            if FileManager.default.fileExists(atPath: inner) { return loadFile(inner, into: &r) }
            for reader in directoryReaders {
                do {
                    if let s = try reader(path) { r.sections += s; return }
                } catch {
                    r.errors.append("\(path): \(error)")
                    return
                }
            }
            r.errors.append("\(path): a folder without report.json (and not a result folder any reader knows)")
            return
        }
        loadFile(path, into: &r)
    }

    func loadFile(_ path: String, into r: inout Result) {
        guard let data = FileManager.default.contents(atPath: path) else {
            r.errors.append("\(path): cannot be read")
            return
        }
        guard let text = String(data: data, encoding: .utf8) else {
            r.errors.append("\(path): not UTF-8 text")
            return
        }
        let json: JSONValue
        do { json = try JSONReader.parse(text) } catch {
            r.errors.append("\(path): not valid JSON: \(error)")
            return
        }
        // `memvirt reproduce` writes {"schema", "reproductions": [...], "skipped": [...]};
        // `--json` for one reproduction prints the reproduction object itself.
        let items: [JSONValue]
        if let list = json["reproductions"]?.asArray {
            items = list
            r.skipped += (json["skipped"]?.asArray ?? []).compactMap(\.asString)
        } else if json["name"] != nil {
            items = [json]
        } else {
            r.errors.append("\(path): not a memvirt report (no \"reproductions\" list and no \"name\")")
            return
        }
        var sections: [ReportSection] = []
        for (i, item) in items.enumerated() {
            do {
                sections.append(try ReportSection.read(item, source: path, warnings: &r.warnings, derive: derive))
            } catch {
                r.errors.append("\(path): reproduction \(i + 1): \(error)")
            }
        }
        r.sections += sections
    }
}
