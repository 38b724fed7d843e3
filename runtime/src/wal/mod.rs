//! The write-ahead log: every change to a node's durable state, in order, with a
//! checksum per record, group commit, snapshots that let the log be truncated, and
//! recovery on start.
//!
//! Appending is cheap and synchronous (encode into a shared buffer under one mutex);
//! a dedicated writer thread turns whatever has accumulated into one `write` and one
//! `fdatasync`, so a single fsync makes many transactions durable. Callers wait for
//! durability with [`Wal::wait_durable`]. The log knows nothing of functions or
//! transactions beyond the record types; applying records is the caller's job.
//!
//! **Invariant:** a position is reported durable only after the bytes of every record
//! up to it were written and (with `Durability::Disk`) fsynced.
//! **Invariant:** recovery never drops a record that has a valid record after it.
//! **Invariant:** recovery never drops a record at or below the durable mark (`mark`):
//! a log that ends before it was cut short, and the node refuses to start.

pub mod mark;
pub mod record;
pub mod segment;
pub mod snapshot;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ids::Lsn;
use crate::metrics::Metrics;
pub use record::Record;
use snapshot::Image;

/// With `Durability::Memory`, how often the writer fsyncs what it has written.
const MEMORY_SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// With `Durability::Memory`, how often the writer wakes to write what accumulated:
/// nobody waits for it, so appenders need not pay for waking it.
const MEMORY_WRITE_INTERVAL: Duration = Duration::from_millis(2);
/// Bytes accumulated but not yet written before appenders are made to wait.
const PENDING_BYTES_MAX: usize = 64 << 20;
/// The most one group-commit batch can hold: what accumulated (appenders wait above
/// `PENDING_BYTES_MAX`) and the frame that crossed the bound. A crash tears at most
/// this much off the end of the log; more after the last valid frame is not a torn tail.
const BATCH_BYTES_MAX: u64 =
    (PENDING_BYTES_MAX + segment::FRAME_HEADER_LEN + segment::RECORD_LEN_MAX) as u64;
/// The log directory and its files are the node's user's alone.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt at offset {offset}: {why}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("the log writer has failed and the node must stop: {0}")]
    WriterFailed(String),
    #[error(
        "{path} ends at offset {offset} (the log ends at LSN {lsn_last}), but the log was \
         durable up to LSN {lsn_durable} (offset {offset_durable} of that segment): it was \
         cut short, not torn by a crash, and acknowledged commits are missing. Restore the \
         data directory from a copy, or accept the loss by starting once with \
         --recover-truncated-log"
    )]
    CutShort {
        path: PathBuf,
        offset: u64,
        lsn_last: Lsn,
        lsn_durable: Lsn,
        offset_durable: u64,
    },
}

/// When a commit is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the record is fsynced.
    #[default]
    Disk,
    /// After the record is in memory; fsynced in the background within
    /// `MEMORY_SYNC_INTERVAL`. A crash of the node may lose the last acknowledged
    /// commits (in a cluster, a single node's crash loses nothing: every replica holds them).
    Memory,
}

impl std::str::FromStr for Durability {
    type Err = String;

    /// `disk` or `memory`, as in a config file.
    fn from_str(s: &str) -> Result<Durability, String> {
        match s {
            "disk" => Ok(Durability::Disk),
            "memory" => Ok(Durability::Memory),
            other => Err(format!(
                "durability must be \"disk\" or \"memory\", not {other:?}"
            )),
        }
    }
}

/// What recovery found in the data directory.
#[derive(Debug, Default)]
pub struct Recovered {
    pub snapshot: Option<Image>,
    /// Records after the snapshot, in order.
    pub records: Vec<(Lsn, Record)>,
    /// Torn tails that were cut, one line each, for the node's log.
    pub warnings: Vec<String>,
}

pub struct Wal {
    shared: Arc<Shared>,
    dir: PathBuf,
    durability: Durability,
    durable_rx: watch::Receiver<Lsn>,
    writer: Option<thread::JoinHandle<()>>,
    bytes_since_checkpoint: std::sync::atomic::AtomicU64,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when there is something for the writer, and when the writer made room
    /// or rotated.
    wake_writer: Condvar,
    wake_appenders: Condvar,
    /// Taken (dropped) when the writer fails, which wakes every waiter with an error.
    durable_tx: Mutex<Option<watch::Sender<Lsn>>>,
    metrics: Arc<Metrics>,
    stats: StatsCounters,
}

#[derive(Default)]
struct StatsCounters {
    fsyncs: std::sync::atomic::AtomicU64,
    fsync_ns: std::sync::atomic::AtomicU64,
    records: std::sync::atomic::AtomicU64,
}

/// Counters of the log writer since the log was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub fsyncs: u64,
    pub fsync_ns: u64,
    pub records: u64,
}

struct Pending {
    bytes: Vec<u8>,
    records: u64,
    lsn_last: Lsn,
    /// Rotate to a new segment after this many bytes of `bytes`, starting at that LSN.
    rotations: Vec<(usize, Lsn)>,
    /// The first LSN of the segment the writer has open.
    segment_first: Lsn,
    failed: Option<String>,
    shutdown: bool,
}

impl Wal {
    /// Open the log in `dir` (created if missing), recovering what it holds.
    ///
    /// Fails when a snapshot or a segment is corrupt anywhere but at the torn end of the
    /// newest segment, or on an I/O error; the error names the file and offset.
    pub fn open(
        dir: &Path,
        durability: Durability,
        metrics: Arc<Metrics>,
    ) -> Result<(Wal, Recovered), Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| Error::Io {
                path: dir.to_owned(),
                source: e,
            })?;
        let (recovered, lsn_last, segment_path, segment_first) = recover(dir)?;
        let file = open_for_append(&segment_path, segment_first)?;
        let mark_file = mark::open(dir).map_err(|e| Error::Io {
            path: dir.join(mark::FILE_NAME),
            source: e,
        })?;
        let (durable_tx, durable_rx) = watch::channel(lsn_last);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::new(),
                records: 0,
                lsn_last,
                rotations: Vec::new(),
                segment_first,
                failed: None,
                shutdown: false,
            }),
            wake_writer: Condvar::new(),
            wake_appenders: Condvar::new(),
            durable_tx: Mutex::new(Some(durable_tx)),
            metrics,
            stats: StatsCounters::default(),
        });
        let writer = {
            let shared = shared.clone();
            let dir_writer = dir.to_owned();
            thread::Builder::new()
                .name("wal-writer".into())
                .spawn(move || {
                    let files = WriterFiles {
                        segment: file,
                        segment_path,
                        mark: mark_file,
                    };
                    writer_loop(&shared, &dir_writer, files, durability)
                })
                .map_err(|e| Error::Io {
                    path: dir.to_owned(),
                    source: e,
                })?
        };
        let wal = Wal {
            shared,
            dir: dir.to_owned(),
            durability,
            durable_rx,
            writer: Some(writer),
            bytes_since_checkpoint: Default::default(),
        };
        Ok((wal, recovered))
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Append `record` and call `apply` with its LSN while still holding the log's
    /// order: records are applied in exactly the order they are logged.
    ///
    /// Fails when the writer has failed (the node must stop).
    pub fn append<R>(
        &self,
        record: &Record,
        apply: impl FnOnce(Lsn) -> R,
    ) -> Result<(Lsn, R), Error> {
        let payload = segment::encode_payload(record);
        self.bytes_since_checkpoint
            .fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut pending = self.shared.pending.lock();
        while pending.bytes.len() > PENDING_BYTES_MAX && pending.failed.is_none() {
            self.shared.wake_appenders.wait(&mut pending);
        }
        if let Some(why) = &pending.failed {
            return Err(Error::WriterFailed(why.clone()));
        }
        let lsn = pending.lsn_last.next();
        segment::encode_frame(&mut pending.bytes, lsn, &payload);
        pending.lsn_last = lsn;
        pending.records += 1;
        let applied = apply(lsn);
        let urgent =
            self.durability == Durability::Disk || pending.bytes.len() > PENDING_BYTES_MAX / 2;
        drop(pending);
        if urgent {
            self.shared.wake_writer.notify_one();
        }
        Ok((lsn, applied))
    }

    /// Run `f` between two appends: no record is appended, nor applied, while it runs,
    /// so what it reads of the state matches the log. `f` must be quick (every commit on
    /// the node waits for it).
    pub fn between_appends<R>(&self, f: impl FnOnce() -> R) -> R {
        let _pending = self.shared.pending.lock();
        f()
    }

    /// The last LSN appended (durable or not).
    pub fn lsn_last(&self) -> Lsn {
        self.shared.pending.lock().lsn_last
    }

    /// The last LSN known durable.
    pub fn lsn_durable(&self) -> Lsn {
        *self.durable_rx.borrow()
    }

    /// Wait until every record up to `lsn` is durable (fsynced with `Durability::Disk`,
    /// written with `Durability::Memory`).
    ///
    /// Fails when the writer has failed. Cancel safe: dropping the future only stops waiting.
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), Error> {
        let mut rx = self.durable_rx.clone();
        let reached = rx.wait_for(|durable| *durable >= lsn).await.is_ok();
        match reached {
            true => Ok(()),
            false => Err(Error::WriterFailed(
                self.shared
                    .pending
                    .lock()
                    .failed
                    .clone()
                    .unwrap_or_else(|| "writer stopped".into()),
            )),
        }
    }

    /// Write a snapshot of the state as of the current end of the log, then delete the
    /// segments and snapshots it makes redundant. `capture` runs while appends are held
    /// off, so it must be quick (clone persistent maps, not copy them); `build` turns what
    /// it captured into the image afterwards. Blocking: call it from a thread that may block.
    ///
    /// Fails on I/O errors; the log stays valid (old segments are only deleted after the
    /// snapshot is durable).
    pub fn checkpoint<C>(
        &self,
        capture: impl FnOnce(Lsn) -> C,
        build: impl FnOnce(C) -> Image,
    ) -> Result<Lsn, Error> {
        let (captured, lsn_cut) = {
            let mut pending = self.shared.pending.lock();
            let lsn_cut = pending.lsn_last;
            let captured = capture(lsn_cut);
            let at = pending.bytes.len();
            pending.rotations.push((at, lsn_cut.next()));
            self.bytes_since_checkpoint
                .store(0, std::sync::atomic::Ordering::Relaxed);
            (captured, lsn_cut)
        };
        self.shared.wake_writer.notify_one();
        // Wait for the rotation first: it fsyncs every record up to the cut. A snapshot
        // must never be ahead of the log, or a crash would leave a log that resumes
        // after a gap.
        {
            let mut pending = self.shared.pending.lock();
            while pending.segment_first < lsn_cut.next() && pending.failed.is_none() {
                self.shared.wake_appenders.wait(&mut pending);
            }
            if let Some(why) = &pending.failed {
                return Err(Error::WriterFailed(why.clone()));
            }
        }
        snapshot::write(&self.dir, &build(captured))?;
        remove_before(&self.dir, lsn_cut)?;
        Ok(lsn_cut)
    }

    pub fn stats(&self) -> Stats {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.shared.stats;
        Stats {
            fsyncs: s.fsyncs.load(Relaxed),
            fsync_ns: s.fsync_ns.load(Relaxed),
            records: s.records.load(Relaxed),
        }
    }

    /// Bytes of records appended since the last checkpoint began.
    pub fn bytes_since_checkpoint(&self) -> u64 {
        self.bytes_since_checkpoint
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.pending.lock().shutdown = true;
        self.shared.wake_writer.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Read the newest snapshot and every segment after it; cut a torn tail, unless the log
/// ends before its durable mark or the tail is more than a batch. Returns what was
/// found, the last LSN, and the segment to append to (with its first LSN).
fn recover(dir: &Path) -> Result<(Recovered, Lsn, PathBuf, Lsn), Error> {
    let io = |e| Error::Io {
        path: dir.to_owned(),
        source: e,
    };
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(lsn) = segment::parse_file_name(&name) {
            segments.push((lsn, entry.path()));
        } else if let Some(lsn) = snapshot::parse_file_name(&name) {
            snapshots.push((lsn, entry.path()));
        } else if name.ends_with(".tmp") {
            // An unfinished snapshot from a crash: never renamed, so never relied upon.
            let _ = fs::remove_file(entry.path());
        }
    }
    segments.sort();
    snapshots.sort();

    let mut recovered = Recovered::default();
    let mut lsn_last = Lsn::ZERO;
    if let Some((_, path)) = snapshots.last() {
        let image = snapshot::read(path)?;
        lsn_last = image.lsn;
        recovered.snapshot = Some(image);
    }
    let lsn_snapshot = lsn_last;

    // Segments wholly covered by the snapshot are skipped (a crash may have left them
    // between writing the snapshot and deleting them).
    let first_needed = segments
        .iter()
        .rposition(|(first, _)| *first <= lsn_snapshot.next())
        .unwrap_or(0);
    let segments = &segments[first_needed..];
    let mut last_segment_end = None;
    // Torn tails are cut only once the whole log has been checked: a refused start
    // leaves the files as they were.
    let mut cuts = Vec::new();
    let mut lens_valid = Vec::new();
    for (i, (lsn_first, path)) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        if *lsn_first > lsn_last.next() {
            return Err(Error::Corrupt {
                path: path.clone(),
                offset: 0,
                why: format!("log gap: segment starts at {lsn_first}, but the log before it ends at {lsn_last}"),
            });
        }
        let bytes = fs::read(path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        let scan = segment::scan(path, &bytes, *lsn_first, is_last)?;
        if let Some(why) = scan.torn {
            let torn = bytes.len() as u64 - scan.len_valid;
            if torn > BATCH_BYTES_MAX {
                return Err(Error::Corrupt {
                    path: path.clone(),
                    offset: scan.len_valid,
                    why: format!(
                        "{why}: {torn} bytes would be cut, more than one group-commit batch \
                         ({BATCH_BYTES_MAX} bytes) could have had in flight, so this is not a torn tail"
                    ),
                });
            }
            cuts.push((path.clone(), scan.len_valid, why));
        }
        lens_valid.push((*lsn_first, scan.len_valid));
        let mut lsn_segment_end = Lsn(lsn_first.0.saturating_sub(1));
        for (lsn, record) in scan.records {
            if lsn > lsn_snapshot {
                recovered.records.push((lsn, record));
            }
            lsn_last = lsn_last.max(lsn);
            lsn_segment_end = lsn;
        }
        if is_last {
            last_segment_end = Some(lsn_segment_end);
        }
    }
    match mark::read(dir) {
        Ok(Some(mark)) if mark.lsn > lsn_last => {
            let offset = lens_valid
                .iter()
                .find(|(first, _)| *first == mark.segment_first)
                .map_or(0, |(_, len)| *len);
            return Err(Error::CutShort {
                path: dir.join(segment::file_name(mark.segment_first)),
                offset,
                lsn_last,
                lsn_durable: mark.lsn,
                offset_durable: mark.offset,
            });
        }
        Ok(_) => {}
        Err(why) => recovered.warnings.push(why),
    }
    for (path, len_valid, why) in cuts {
        truncate(&path, len_valid)?;
        recovered
            .warnings
            .push(format!("{}: {why}", path.display()));
    }
    // Append to the last segment only if it ends where the log ends; a snapshot ahead of
    // it (written by an older build that did not wait for the rotation) must not leave
    // a gap inside a segment.
    let (segment_path, segment_first) = match segments.last() {
        Some((first, path)) if last_segment_end == Some(lsn_last) => (path.clone(), *first),
        _ => (
            dir.join(segment::file_name(lsn_last.next())),
            lsn_last.next(),
        ),
    };
    Ok((recovered, lsn_last, segment_path, segment_first))
}

fn truncate(path: &Path, len: u64) -> Result<(), Error> {
    let io = |e| Error::Io {
        path: path.to_owned(),
        source: e,
    };
    let file = OpenOptions::new().write(true).open(path).map_err(io)?;
    file.set_len(len).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Open `path` for appending, writing its header first if it is new or was cut to nothing.
fn open_for_append(path: &Path, lsn_first: Lsn) -> Result<File, Error> {
    let io = |e| Error::Io {
        path: path.to_owned(),
        source: e,
    };
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io)?;
    if file.metadata().map_err(io)?.len() == 0 {
        file.write_all(&segment::encode_header(lsn_first))
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = path.parent() {
            snapshot::sync_dir(dir)?;
        }
    }
    Ok(file)
}

/// Delete segments and snapshots made redundant by the snapshot at `lsn_cut`.
fn remove_before(dir: &Path, lsn_cut: Lsn) -> Result<(), Error> {
    let io = |e| Error::Io {
        path: dir.to_owned(),
        source: e,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let redundant = match (
            segment::parse_file_name(&name),
            snapshot::parse_file_name(&name),
        ) {
            (Some(first), _) => first <= lsn_cut,
            (_, Some(lsn)) => lsn < lsn_cut,
            _ => false,
        };
        if redundant {
            fs::remove_file(entry.path()).map_err(|e| Error::Io {
                path: entry.path(),
                source: e,
            })?;
        }
    }
    snapshot::sync_dir(dir)
}

/// The files the writer thread owns.
struct WriterFiles {
    segment: File,
    segment_path: PathBuf,
    mark: File,
}

/// The writer thread: take what accumulated, write it, fsync, publish, and move the
/// durable mark every `mark::MARK_INTERVAL_BYTES`. Any I/O error is fatal: after a
/// failed fsync the kernel may have dropped the dirty pages, so retrying could report
/// lost data as durable.
fn writer_loop(shared: &Shared, dir: &Path, files: WriterFiles, durability: Durability) {
    let WriterFiles {
        segment: mut file,
        segment_path: mut path,
        mark: mark_file,
    } = files;
    let mut dirty_since: Option<Instant> = None;
    // Bytes written since the mark last moved.
    let mut unmarked: u64 = 0;
    loop {
        let (bytes, records, lsn_hi, rotations, shutdown) = {
            let mut pending = shared.pending.lock();
            loop {
                if !pending.bytes.is_empty() || !pending.rotations.is_empty() || pending.shutdown {
                    break;
                }
                match (durability, dirty_since) {
                    (Durability::Disk, _) => shared.wake_writer.wait(&mut pending),
                    (Durability::Memory, since) => {
                        let write_at = Instant::now() + MEMORY_WRITE_INTERVAL;
                        let timed_out = shared
                            .wake_writer
                            .wait_until(&mut pending, write_at)
                            .timed_out();
                        if timed_out && since.is_some_and(|s| s.elapsed() >= MEMORY_SYNC_INTERVAL) {
                            break;
                        }
                    }
                }
            }
            let bytes = std::mem::take(&mut pending.bytes);
            let records = std::mem::take(&mut pending.records);
            let rotations = std::mem::take(&mut pending.rotations);
            (
                bytes,
                records,
                pending.lsn_last,
                rotations,
                pending.shutdown,
            )
        };
        shared.wake_appenders.notify_all();

        let result = write_batch(shared, dir, &mut file, &mut path, &bytes, &rotations);
        unmarked += bytes.len() as u64;
        let mut synced = false;
        let result = result.and_then(|()| {
            let sync_now = durability == Durability::Disk
                || shutdown
                || dirty_since.is_some_and(|since| since.elapsed() >= MEMORY_SYNC_INTERVAL);
            if sync_now && (!bytes.is_empty() || dirty_since.is_some()) {
                let started = Instant::now();
                file.sync_data().map_err(|e| Error::Io {
                    path: path.clone(),
                    source: e,
                })?;
                let took = started.elapsed();
                shared
                    .metrics
                    .fsync_latency_seconds
                    .observe(took.as_secs_f64());
                let stats = &shared.stats;
                stats
                    .fsyncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stats
                    .fsync_ns
                    .fetch_add(took.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
                dirty_since = None;
                synced = true;
            } else if !bytes.is_empty() && dirty_since.is_none() {
                dirty_since = Some(Instant::now());
            }
            Ok(())
        });
        let result = result.and_then(|()| {
            if !synced || unmarked < mark::MARK_INTERVAL_BYTES {
                return Ok(());
            }
            unmarked = 0;
            move_mark(&mark_file, &file, &path, lsn_hi)
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "log writer failed; the node must stop");
            shared.pending.lock().failed = Some(e.to_string());
            shared.wake_appenders.notify_all();
            shared.durable_tx.lock().take();
            // Dropping the sender wakes every waiter with an error.
            return;
        }
        if records > 0 {
            shared.metrics.fsync_batch_records.observe(records as f64);
            shared
                .stats
                .records
                .fetch_add(records, std::sync::atomic::Ordering::Relaxed);
            shared.metrics.log_bytes.inc_by(bytes.len() as u64);
        }
        if let Some(tx) = shared.durable_tx.lock().as_ref() {
            tx.send_replace(lsn_hi);
        }
        if shutdown {
            return;
        }
    }
}

/// Record that everything up to `lsn`, the end of the segment `file` at `path`, is
/// durable. Call only right after fsyncing it.
fn move_mark(mark_file: &File, file: &File, path: &Path, lsn: Lsn) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e| Error::Io { path, source: e }
    };
    let offset = file.metadata().map_err(io(path))?.len();
    let segment_first = path
        .file_name()
        .and_then(|n| segment::parse_file_name(&n.to_string_lossy()))
        .expect("the writer only writes to segments named by segment::file_name");
    let mark = mark::Mark {
        lsn,
        segment_first,
        offset,
    };
    mark::write(mark_file, &mark).map_err(io(&path.with_file_name(mark::FILE_NAME)))
}

/// Write `bytes` to the open segment, switching to a new segment at each rotation
/// point (fsyncing the old one first, so a finished segment is always complete).
fn write_batch(
    shared: &Shared,
    dir: &Path,
    file: &mut File,
    path: &mut PathBuf,
    bytes: &[u8],
    rotations: &[(usize, Lsn)],
) -> Result<(), Error> {
    let mut written = 0;
    for &(at, lsn_first) in rotations {
        file.write_all(&bytes[written..at]).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        written = at;
        file.sync_data().map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        let next = dir.join(segment::file_name(lsn_first));
        if next != *path {
            *file = open_for_append(&next, lsn_first)?;
            *path = next;
        }
        shared.pending.lock().segment_first = lsn_first;
        shared.wake_appenders.notify_all();
    }
    file.write_all(&bytes[written..]).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{FunctionName, TxnId};
    use record::{Commit, Op, Writes};

    fn commit(n: u64) -> Record {
        Record::Commit(Commit {
            txn: TxnId(n),
            writes: vec![Writes {
                function: FunctionName::new("f").expect("valid"),
                ops: vec![Op {
                    key: n.to_be_bytes().to_vec(),
                    value: Some(vec![1; 10]),
                }],
            }],
            idempotency: None,
            epochs: Vec::new(),
            decision: None,
        })
    }

    #[tokio::test]
    async fn appended_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (wal, recovered) =
                Wal::open(dir.path(), Durability::Disk, Arc::default()).expect("open");
            assert!(recovered.records.is_empty());
            let mut last = Lsn::ZERO;
            for n in 1..=100 {
                last = wal.append(&commit(n), |_| ()).expect("append").0;
            }
            wal.wait_durable(last).await.expect("durable");
        }
        let (_wal, recovered) =
            Wal::open(dir.path(), Durability::Disk, Arc::default()).expect("reopen");
        assert_eq!(recovered.records.len(), 100);
        assert_eq!(recovered.records[99], (Lsn(100), commit(100)));
    }

    #[tokio::test]
    async fn checkpoint_truncates_the_log_and_recovery_resumes_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (wal, _) = Wal::open(dir.path(), Durability::Disk, Arc::default()).expect("open");
            for n in 1..=10 {
                wal.append(&commit(n), |_| ()).expect("append");
            }
            let cut = wal
                .checkpoint(
                    |lsn| lsn,
                    |lsn| Image {
                        lsn,
                        functions: vec![],
                    },
                )
                .expect("checkpoint");
            assert_eq!(cut, Lsn(10));
            let (last, ()) = wal.append(&commit(11), |_| ()).expect("append");
            wal.wait_durable(last).await.expect("durable");
        }
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.contains(&segment::file_name(Lsn(1))),
            "old segment removed: {names:?}"
        );
        let (wal, recovered) =
            Wal::open(dir.path(), Durability::Disk, Arc::default()).expect("reopen");
        assert_eq!(recovered.snapshot.expect("snapshot").lsn, Lsn(10));
        assert_eq!(recovered.records, vec![(Lsn(11), commit(11))]);
        assert_eq!(wal.lsn_last(), Lsn(11));
    }

    /// Regression: a snapshot ahead of the log's last segment (what an older build's
    /// checkpoint could leave after a crash) made recovery append after a gap, and the
    /// next recovery refused the log or cut acknowledged records as a torn tail.
    #[tokio::test]
    async fn snapshot_ahead_of_the_log_does_not_leave_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (wal, _) = Wal::open(dir.path(), Durability::Disk, Arc::default()).expect("open");
            let mut last = Lsn::ZERO;
            for n in 1..=5 {
                last = wal.append(&commit(n), |_| ()).expect("append").0;
            }
            wal.wait_durable(last).await.expect("durable");
        }
        snapshot::write(
            dir.path(),
            &Image {
                lsn: Lsn(8),
                functions: vec![],
            },
        )
        .expect("snapshot");
        {
            let (wal, recovered) =
                Wal::open(dir.path(), Durability::Disk, Arc::default()).expect("reopen");
            assert!(recovered.records.is_empty());
            assert_eq!(wal.lsn_last(), Lsn(8));
            let (lsn, ()) = wal.append(&commit(9), |_| ()).expect("append");
            assert_eq!(lsn, Lsn(9));
            wal.wait_durable(lsn).await.expect("durable");
        }
        let (_wal, recovered) =
            Wal::open(dir.path(), Durability::Disk, Arc::default()).expect("second reopen");
        assert_eq!(
            recovered.records,
            vec![(Lsn(9), commit(9))],
            "the record after the snapshot survives"
        );
        assert!(
            recovered.warnings.is_empty(),
            "nothing was cut: {:?}",
            recovered.warnings
        );
    }
}
