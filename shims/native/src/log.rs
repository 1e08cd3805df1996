//! The shim's own log: JSON lines (timestamp, level, event, bound context, fields) in shim.log of the
//! pod's bundle, appended by the writer thread like every other file the shim writes.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::writer::FileWriter;

#[derive(Clone)]
pub struct Logger {
    writer: Option<FileWriter>,
    path: Arc<str>,
    context: Arc<Map<String, Value>>,
}

/// RFC 3339 UTC with microseconds, as the Python shims write it.
pub fn timestamp(ns: u64, digits: usize) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let frac = ns % 1_000_000_000;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: gmtime_r writes into our struct.
    unsafe { libc::gmtime_r(&secs, &mut tm) };
    let frac = if digits == 9 { format!("{frac:09}") } else { format!("{:06}", frac / 1000) };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{frac}Z",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

impl Logger {
    pub fn new(writer: Option<FileWriter>, path: &str, context: &[(&str, Value)]) -> Self {
        let map = context.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        Logger { writer, path: path.into(), context: Arc::new(map) }
    }

    pub fn bind(&self, key: &str, value: impl Into<Value>) -> Logger {
        let mut map = (*self.context).clone();
        map.insert(key.to_string(), value.into());
        Logger { context: Arc::new(map), ..self.clone() }
    }

    fn emit(&self, level: &str, event: &str, fields: &[(&str, Value)]) {
        let Some(writer) = &self.writer else { return };
        let mut rec = Map::new();
        rec.insert("timestamp".into(), Value::String(timestamp(crate::reaper::now_ns(), 6)));
        rec.insert("level".into(), level.into());
        rec.insert("event".into(), event.into());
        for (k, v) in self.context.iter() {
            rec.insert(k.clone(), v.clone());
        }
        for (k, v) in fields {
            rec.insert(k.to_string(), v.clone());
        }
        let mut line = Value::Object(rec).to_string().into_bytes();
        line.push(b'\n');
        writer.append(&self.path, line);
    }

    pub fn info(&self, event: &str, fields: &[(&str, Value)]) {
        self.emit("info", event, fields);
    }

    pub fn error(&self, event: &str, fields: &[(&str, Value)]) {
        self.emit("error", event, fields);
    }
}
