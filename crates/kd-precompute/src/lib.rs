//! Stage 2, precompute: runs the frozen teacher once, in eval mode and without augmentation,
//! over every training image and writes the logits of all its heads, in dataset order, to the
//! knowledge file (`soft-targets.safetensors`; format in `kd-knowledge`).
//!
//! On more than one machine the rows are cut into shards (`--shard I/N`, or an array job's index
//! from the environment: see [`sharding`]), each task writes one shard file, and
//! `kd-precompute merge` checks them and writes the same knowledge file, byte for byte.

use anyhow::Context as _;
use kd_knowledge::shard::{Shard, ShardMeta, ShardSpec, SHARD_FORMAT_VERSION};
use kd_knowledge::{
    DatasetRef, KnowledgeFile, LogitDtype, LogitStorage, Metadata, RowData, TeacherRef, Transform,
    ViewsMeta, FORMAT_VERSION, FORMAT_VERSION_LABELLED, FORMAT_VERSION_VIEWS,
};
use kd_train::manifest::stage_key;
use kd_train::stage::{threads, LoadedData, Pipeline};
use kd_train::table::Table;
use kd_train::{predict, KnowledgeRecord, Manifest, PipelineArgs, CHECKPOINT};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub mod merge;
pub mod sharding;

use kd_train::stage::layout::TEACHER;
pub use kd_train::stage::layout::{KNOWLEDGE as STAGE, KNOWLEDGE_FILE};
pub use sharding::{ShardArgs, ShardChoice};

/// The folder of the shard files, inside the knowledge stage's folder.
pub const SHARDS_DIR: &str = "shards";

/// Compute the teacher's soft targets for the whole training set (or one shard of it).
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "kd-precompute",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub sharding: ShardArgs,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Check that the shards in <artifacts>/<pipeline>/knowledge/shards cover every row once,
    /// for this pipeline's data and teacher, and write the knowledge file from them.
    Merge(MergeArgs),
    /// Check that the knowledge file is the one this pipeline's data and teacher give (as
    /// recorded by the run or merge that wrote it) and that it reads back; computes nothing.
    Verify(VerifyArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub source: SourceArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct MergeArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Merge the shards of an N-way split (needed only when shards of several splits are there).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
}

/// Which teacher, and how it is run.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// Teacher checkpoint [default: <artifacts>/<pipeline>/teacher/model.safetensors, or the same
    /// tag's teacher when --tag names a run that has one].
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Inference batch size (overrides knowledge.batch_size; shards are cut on its batch edges).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Views per image (overrides knowledge.views): 1 = the image as it is; K > 1 also stores
    /// K - 1 augmented views and the teacher's logits for each, for the student to replay.
    #[arg(long)]
    pub views: Option<usize>,
    /// Precision of the stored logits, f32 or f16 (overrides knowledge.dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Store only the K largest logits per row and one logit for the other classes (overrides
    /// knowledge.top_k; 0 keeps all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Write to <artifacts>/<pipeline>/runs/<TAG>/knowledge/ instead of knowledge/ (a second
    /// knowledge file beside the pipeline's, e.g. a multi-view one; students read it with
    /// --knowledge).
    #[arg(long, value_parser = kd_train::stage::parse_tag)]
    pub tag: Option<String>,
}

/// The precompute's settings, as its manifest records them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnowledgeSettings {
    pub data: kd_train::record::DataSettings,
    pub teacher_arch: String,
    pub transform: Transform,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<ViewsMeta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<LogitStorage>,
}

impl SourceArgs {
    /// The flags as `--set knowledge.*` overrides.
    fn overrides(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .batch_size
            .iter()
            .map(|b| format!("knowledge.batch_size={b}"))
            .collect();
        v.extend(self.views.map(|k| format!("knowledge.views={k}")));
        v.extend(
            self.dtype
                .as_ref()
                .map(|d| format!("knowledge.dtype={d:?}")),
        );
        v.extend(self.top_k.map(|k| format!("knowledge.top_k={k}")));
        v
    }
}

/// What a run produced.
#[derive(Debug)]
pub enum Output {
    /// The knowledge file, computed, merged or found up to date; its manifest.
    Knowledge(Box<Manifest>),
    /// One shard file; `skipped` when a valid, matching one was already there.
    Shard { path: PathBuf, skipped: bool },
}

impl Output {
    /// The knowledge stage's manifest, or an error for a shard run.
    pub fn into_manifest(self) -> anyhow::Result<Manifest> {
        match self {
            Output::Knowledge(m) => Ok(*m),
            Output::Shard { path, .. } => anyhow::bail!(
                "wrote the shard {}, not the knowledge file (merge the shards with `kd-precompute merge`)",
                path.display()
            ),
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<Output> {
    let started = Instant::now();
    match &args.command {
        Some(Command::Merge(m)) => {
            let job = Job::prepare(&m.pipeline, &m.source)?;
            let _lock = kd_train::verify::RunLock::acquire(&job.dir)?;
            merge::run(&job, m.shards, started).map(|m| Output::Knowledge(Box::new(m)))
        }
        Some(Command::Verify(v)) => {
            let job = Job::prepare(&v.pipeline, &v.source)?;
            job.verify().map(|m| Output::Knowledge(Box::new(m)))
        }
        None => {
            let choice = sharding::choose(&args.sharding, &|k| std::env::var(k).ok())?;
            let job = Job::prepare(&args.pipeline, &args.source)?;
            match choice {
                ShardChoice::Whole => {
                    let _lock = kd_train::verify::RunLock::acquire(&job.dir)?;
                    job.run_whole(started)
                        .map(|m| Output::Knowledge(Box::new(m)))
                }
                ShardChoice::Shard { spec, source } => job.run_shard(spec, &source),
            }
        }
    }
}

/// Everything a precompute, a shard or a merge needs: the pipeline, its data, the teacher's
/// identity, and the knowledge file's metadata and freshness key.
pub struct Job {
    pub pipeline: Pipeline,
    pub data: LoadedData,
    pub checkpoint: PathBuf,
    pub batch_size: usize,
    pub dir: PathBuf,
    pub path: PathBuf,
    pub meta: Metadata,
    pub settings: serde_json::Value,
    pub inputs: BTreeMap<String, String>,
    pub key: String,
}

impl Job {
    pub fn prepare(args: &PipelineArgs, source: &SourceArgs) -> anyhow::Result<Self> {
        let pipeline = args.open(&source.overrides())?;
        let arch = pipeline.config.teacher.arch.clone();
        let checkpoint = source
            .teacher
            .clone()
            .unwrap_or_else(|| pipeline.input(TEACHER, CHECKPOINT, source.tag.as_deref()));
        let rerun = match &source.tag {
            Some(t) => format!("just teacher {} --tag {t}", pipeline.name),
            None => format!("just teacher {}", pipeline.name),
        };
        let teacher_sha = kd_train::verify::verified(&checkpoint, &rerun)?;
        let data = pipeline.load_data()?;
        kd_models::check_input(&arch, &data.spec)?;
        let dir = pipeline.dir(&kd_train::stage::stage_name(STAGE, source.tag.as_deref()));
        let meta = metadata(&pipeline, &data, &arch, teacher_sha.clone())?;
        let settings = kd_train::record::to_json(&KnowledgeSettings {
            data: pipeline.data_settings(),
            teacher_arch: arch,
            transform: meta.transform.clone(),
            views: meta.views.clone(),
            storage: meta.storage,
        })?;
        let mut inputs = BTreeMap::from([
            ("dataset.train".to_string(), data.train_fingerprint.clone()),
            ("teacher".to_string(), teacher_sha),
        ]);
        inputs.extend(
            data.label_mask_fingerprint()
                .map(|f| ("dataset.labelled".to_string(), f)),
        );
        Ok(Self {
            key: stage_key(STAGE, &settings, &inputs),
            batch_size: pipeline.config.knowledge.batch_size,
            path: dir.join(KNOWLEDGE_FILE),
            pipeline,
            data,
            checkpoint,
            dir,
            meta,
            settings,
            inputs,
        })
    }

    pub fn shards_dir(&self) -> PathBuf {
        self.dir.join(SHARDS_DIR)
    }

    /// The teacher's logits for `rows` (one buffer per head) and the seconds they took.
    fn infer(&self, rows: &[u32], label: &str) -> anyhow::Result<(Vec<Vec<f32>>, f64)> {
        let arch = &self.meta.teacher.architecture;
        let teacher =
            kd_models::load_frozen(arch, &self.data.spec, &self.checkpoint, &self.data.device)?;
        anyhow::ensure!(
            teacher
                .heads()
                .iter()
                .map(|h| h.to_string())
                .eq(self.meta.heads.iter().cloned()),
            "teacher {arch} has heads {:?}, expected {:?}",
            teacher.heads(),
            self.meta.heads
        );
        tracing::info!(
            "precompute: {arch} from {}, {} images, batch {}, {} threads",
            self.checkpoint.display(),
            rows.len(),
            self.batch_size,
            threads()
        );
        let t0 = Instant::now();
        let mut set = self.data.all_train();
        set.rows = rows;
        let mut logits = predict(teacher.as_ref(), set, self.batch_size, label)?;
        if logits.is_empty() {
            logits = vec![Vec::new(); self.meta.heads.len()];
        }
        Ok((logits, t0.elapsed().as_secs_f64()))
    }

    /// The knowledge file on disk is up to date with this pipeline's data and teacher, and valid.
    fn verify(&self) -> anyhow::Result<Manifest> {
        if let Some(why) = Manifest::staleness(&self.dir, &self.key, &self.settings, &self.inputs) {
            anyhow::bail!(
                "{} is not this pipeline's knowledge: {why}",
                self.path.display()
            );
        }
        KnowledgeFile::open(&self.path)?
            .check_dataset(&self.meta.dataset, &self.data.dataset.train.labels)?;
        let manifest = Manifest::read(&self.dir)?;
        println!(
            "ok: {} ({} rows, heads {}, teacher {}, sha256 {})",
            self.path.display(),
            self.meta.dataset.rows,
            self.meta.heads.join(", "),
            &self.meta.teacher.checkpoint_sha256
                [..12.min(self.meta.teacher.checkpoint_sha256.len())],
            kd_data::sha256_file(&self.path)?
        );
        Ok(manifest)
    }

    /// The whole knowledge file in this process.
    fn run_whole(&self, started: Instant) -> anyhow::Result<Manifest> {
        if let Some(m) =
            self.pipeline
                .up_to_date(STAGE, &self.dir, &self.key, &self.settings, &self.inputs)
        {
            return Ok(m);
        }
        if let Some(v) = self.meta.views.clone() {
            return self.run_views(&v, started);
        }
        let (logits, seconds) = self.infer(&self.data.all_rows, "precompute")?;
        self.commit(&logits, None, Some(seconds), None, started)
    }

    /// K views per image: view 0 as it is, views 1.. drawn by the student's augmentation from
    /// the view seed (view j of row r is `augment.view(seed, j, r)`), the teacher's logits for
    /// each, and the views' parameters so the student can replay them exactly.
    fn run_views(&self, v: &ViewsMeta, started: Instant) -> anyhow::Result<Manifest> {
        let arch = &self.meta.teacher.architecture;
        let teacher =
            kd_models::load_frozen(arch, &self.data.spec, &self.checkpoint, &self.data.device)?;
        let d = &self.data;
        let (n, k, c) = (d.all_rows.len(), v.count, self.meta.dataset.classes);
        tracing::info!(
            "precompute: {arch} from {}, {n} images × {k} views ({:?}, seed {}), batch {}, {} threads",
            self.checkpoint.display(),
            v.augment,
            v.seed,
            self.batch_size,
            threads()
        );
        let t0 = Instant::now();
        let heads = self.meta.heads.len();
        let mut logits = vec![vec![0f32; n * k * c]; heads];
        for j in 0..k {
            let mut batches = kd_data::Batches::new(
                &d.train_images,
                &d.train_labels,
                &d.all_rows,
                self.batch_size,
            );
            if j > 0 {
                batches = batches.augmented(
                    v.augment,
                    v.seed,
                    j,
                    &d.dataset.normalization,
                    d.dataset.train_sources.as_deref(),
                );
            }
            let view = kd_train::predict_batches(
                teacher.as_ref(),
                batches,
                &format!("precompute view {j}/{k}"),
            )?;
            for (out, got) in logits.iter_mut().zip(&view) {
                for (r, row) in got.chunks_exact(c).enumerate() {
                    out[(r * k + j) * c..(r * k + j + 1) * c].copy_from_slice(row);
                }
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let views = stored_views(d, v);
        self.commit(&logits, Some(&views), Some(seconds), None, started)
    }

    /// One shard: skipped when a valid shard for the same data, teacher and cut is there.
    fn run_shard(&self, spec: ShardSpec, source: &str) -> anyhow::Result<Output> {
        anyhow::ensure!(
            self.meta.views.is_none(),
            "shards of a multi-view knowledge file (knowledge.views > 1) are not supported yet; compute it in one process"
        );
        let rows = self.data.all_rows.len();
        let range = spec.rows(rows, self.batch_size);
        let path = self.shards_dir().join(spec.file_name());
        tracing::info!(
            "precompute: shard {spec} ({source}): rows {}..{} of {rows}",
            range.start,
            range.end
        );
        let want = ShardMeta {
            format_version: SHARD_FORMAT_VERSION,
            knowledge: self.meta.clone(),
            shard: spec,
            start: range.start,
            end: range.end,
            batch_size: self.batch_size,
            sha256: String::new(),
        };
        if path.exists() && !self.pipeline.force {
            match Shard::open(&path) {
                Ok(s) if s.meta.identity() == want.identity() => {
                    tracing::info!(
                        "precompute: shard {spec} is already in {} and matches (data, teacher, rows, checksum); skipped (--force recomputes it)",
                        path.display()
                    );
                    return Ok(Output::Shard {
                        path,
                        skipped: true,
                    });
                }
                Ok(_) => tracing::info!(
                    "precompute: {} was made for other data, teacher or cut; recomputing",
                    path.display()
                ),
                Err(e) => tracing::warn!("precompute: {e:#}; recomputing"),
            }
        }
        let (logits, seconds) =
            self.infer(&self.data.all_rows[range.clone()], &format!("shard {spec}"))?;
        let labels = &self.data.dataset.train.labels[range.clone()];
        kd_knowledge::shard::write_shard(&path, &want, &logits, labels)?;
        // Read back: a shard that does not validate is never reported as done.
        Shard::open(&path).with_context(|| {
            format!(
                "the shard just written, {}, does not read back",
                path.display()
            )
        })?;
        let mut t = Table::new(&["shard", "rows", "img/s", "inference", "file"]);
        t.row(&[
            spec.to_string(),
            format!("{}..{}", range.start, range.end),
            format!("{:.0}", range.len() as f64 / seconds.max(1e-9)),
            format!("{seconds:.1}s"),
            path.display().to_string(),
        ]);
        println!("\n{}", t.to_markdown());
        Ok(Output::Shard {
            path,
            skipped: false,
        })
    }

    /// Commits the knowledge file: the logits must be finite (else the teacher is named and
    /// nothing on disk changes); the previous manifest goes first, then the file (validated before
    /// it replaces the old one), read back as a student will, then the new manifest. `logits`
    /// hold K views per row when `views` are given.
    pub(crate) fn commit(
        &self,
        logits: &[Vec<f32>],
        views: Option<&[kd_data::View]>,
        seconds: Option<f64>,
        shards: Option<usize>,
        started: Instant,
    ) -> anyhow::Result<Manifest> {
        self.check_finite(logits)?;
        remove_manifest(&self.dir)?;
        let labels = &self.data.dataset.train.labels;
        let rows = RowData {
            labels,
            labelled: self.data.label_mask.as_deref(),
            views,
        };
        kd_knowledge::write_rows(&self.path, &self.meta, logits, rows)?;
        // View 0's logits, for the sanity check and the table.
        let (k, c) = (self.meta.view_count(), self.meta.dataset.classes);
        let first: Vec<Vec<f32>> = logits
            .iter()
            .map(|l| {
                l.chunks_exact(k * c)
                    .flat_map(|r| r[..c].to_vec())
                    .collect()
            })
            .collect();
        self.record(&first, labels, seconds, shards, started)
    }

    /// Refuses logits that are not all finite, naming the teacher, the head and the row.
    fn check_finite(&self, logits: &[Vec<f32>]) -> anyhow::Result<()> {
        let per_row = self.meta.view_count() * self.meta.dataset.classes;
        for (head, l) in self.meta.heads.iter().zip(logits) {
            if let Some(i) = l.iter().position(|x| !x.is_finite()) {
                anyhow::bail!(
                    "the teacher {} gives a non-finite logit ({}) on head {head}, training row {}: \
                     its weights are not usable; nothing was written",
                    self.checkpoint.display(),
                    l[i],
                    i / per_row.max(1)
                );
            }
        }
        Ok(())
    }

    /// Reads the knowledge file just written back as a student will, and records the stage's
    /// manifest; `logits` are view 0's.
    fn record(
        &self,
        logits: &[Vec<f32>],
        labels: &[u32],
        seconds: Option<f64>,
        shards: Option<usize>,
        started: Instant,
    ) -> anyhow::Result<Manifest> {
        let path = &self.path;
        let rows = self.meta.dataset.rows;
        KnowledgeFile::open(path)?
            .check_dataset(&self.meta.dataset, &self.data.dataset.train.labels)
            .with_context(|| {
                format!(
                    "the knowledge file just written, {}, does not read back",
                    path.display()
                )
            })?;
        let (agreement, counted) = self.agreement(logits, labels);
        let bytes = std::fs::metadata(path)?.len();
        // A merge does not know how long the shards took (their files hold no timings; the
        // engine's logs do), so it records no speed.
        let images_per_sec = seconds.map(|s| (rows * self.meta.view_count()) as f64 / s.max(1e-9));
        let record = KnowledgeRecord {
            rows,
            classes: self.meta.dataset.classes,
            heads: self.meta.heads.clone(),
            batch_size: self.batch_size,
            inference_seconds: seconds,
            images_per_sec,
            bytes,
            bytes_per_image: bytes as f64 / rows.max(1) as f64,
            views: self.meta.view_count(),
            storage: self.meta.storage().to_string(),
            shards,
            train_accuracy_per_head: agreement,
            labelled_rows: self.data.label_mask.as_ref().map(|_| counted),
        };
        let manifest = Manifest {
            settings: self.settings.clone(),
            inputs: self.inputs.clone(),
            wall_seconds: started.elapsed().as_secs_f64(),
            metrics: serde_json::to_value(&record)?,
            ..Manifest::start(STAGE, &self.pipeline.name, self.key.clone())
        }
        .write(&self.dir, &[KNOWLEDGE_FILE])?;
        print_summary(path, &record);
        Ok(manifest)
    }

    /// How often each head's arg-max agrees with the labels on the labelled training rows (a
    /// sanity check of the teacher), and how many rows that is.
    fn agreement(&self, logits: &[Vec<f32>], labels: &[u32]) -> (BTreeMap<String, f64>, usize) {
        let c = self.meta.dataset.classes;
        let mask = self.data.label_mask.as_deref();
        let labelled = |i: usize| mask.is_none_or(|m| m[i] == 1);
        let counted = (0..self.meta.dataset.rows).filter(|&i| labelled(i)).count();
        let per_head = self
            .meta
            .heads
            .iter()
            .zip(logits)
            .map(|(h, l)| {
                let hits = l
                    .chunks(c)
                    .zip(labels)
                    .enumerate()
                    .filter(|(i, (row, &y))| labelled(*i) && argmax(row) == y as usize)
                    .count();
                (h.clone(), hits as f64 / counted.max(1) as f64)
            })
            .collect();
        (per_head, counted)
    }
}

/// The knowledge file's metadata for this pipeline's data and settings and this teacher.
fn metadata(
    pipeline: &Pipeline,
    data: &LoadedData,
    arch: &str,
    teacher_sha: String,
) -> anyhow::Result<Metadata> {
    let transform = Transform {
        input: [data.spec.channels, data.spec.height, data.spec.width],
        normalization: data.dataset.normalization.clone(),
        augmentation: "none".into(),
    };
    // Several views: the augmentation the student would use, drawn from the view seed.
    let k = &pipeline.config.knowledge;
    let views = (k.views > 1).then(|| ViewsMeta {
        count: k.views,
        augment: pipeline
            .config
            .data
            .augmentation(true, pipeline.config.student.crop_padding)
            .unwrap_or(kd_data::Augment::CropFlip { crop_padding: 2 }),
        seed: k.view_seed,
    });
    let storage = LogitStorage {
        dtype: match k.dtype {
            kd_train::config::Precision::F32 => LogitDtype::F32,
            kd_train::config::Precision::F16 => LogitDtype::F16,
        },
        top_k: (k.top_k > 0).then_some(k.top_k),
    };
    Ok(Metadata {
        format_version: match (&views, &data.label_mask) {
            (_, Some(_)) => FORMAT_VERSION_LABELLED,
            (Some(_), None) => FORMAT_VERSION_VIEWS,
            (None, None) => FORMAT_VERSION,
        },
        dataset: DatasetRef::training(
            &data.dataset.name,
            data.spec.classes,
            &data.train_fingerprint,
            data.all_rows.len(),
            data.label_mask.as_deref(),
        ),
        teacher: TeacherRef {
            architecture: arch.to_string(),
            checkpoint_sha256: teacher_sha,
        },
        heads: kd_models::heads(arch)?
            .iter()
            .map(|h| h.to_string())
            .collect(),
        transform,
        views,
        storage: (!storage.is_full_f32()).then_some(storage),
    })
}

/// The view parameters of every training row: view 0 the image as it is, views 1.. drawn by
/// the augmentation from the view seed (view j of row r is `augment.view(seed, j, r, ...)`).
fn stored_views(d: &LoadedData, v: &ViewsMeta) -> Vec<kd_data::View> {
    let (w, h) = (d.spec.width as u32, d.spec.height as u32);
    let mut views = Vec::with_capacity(d.all_rows.len() * v.count);
    for &row in &d.all_rows {
        let source = match &d.dataset.train_sources {
            Some(s) => (s[row as usize].width, s[row as usize].height),
            None => (w, h),
        };
        views.push(match v.augment {
            kd_data::Augment::CropFlip { .. } => kd_data::View::Shift {
                dx: 0,
                dy: 0,
                flip: false,
            },
            kd_data::Augment::ResizedCropFlip { .. } => kd_data::View::Crop {
                x: 0,
                y: 0,
                w: source.0,
                h: source.1,
                flip: false,
            },
        });
        views.extend((1..v.count).map(|j| v.augment.view(v.seed, j, row, source)));
    }
    views
}

/// Removes a stage's manifest before its outputs are replaced: until the new one is written, no
/// manifest vouches for the folder.
fn remove_manifest(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(Manifest::path(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(anyhow::anyhow!(
            "{}: cannot replace: {e}",
            Manifest::path(dir).display()
        )),
        _ => Ok(()),
    }
}

/// The precompute's numbers as a table.
fn print_summary(path: &Path, r: &KnowledgeRecord) {
    let mut t = Table::new(&[
        "rows",
        "heads",
        "train acc (main)",
        "img/s",
        "inference",
        "file size",
    ]);
    t.row(&[
        r.rows.to_string(),
        r.heads.join(", "),
        format!(
            "{:.2}%",
            100.0
                * r.train_accuracy_per_head
                    .get("main")
                    .copied()
                    .unwrap_or(0.0)
        ),
        r.images_per_sec.map_or("-".into(), |v| format!("{v:.0}")),
        match (r.inference_seconds, r.shards) {
            (Some(s), _) => format!("{s:.1}s"),
            (None, Some(n)) => format!("{n} shards"),
            (None, None) => "-".into(),
        },
        format!("{:.1} MiB", r.bytes as f64 / (1 << 20) as f64),
    ]);
    println!("\n{}\nwrote {}", t.to_markdown(), path.display());
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}

/// Whether `path` is named like a shard file (`shard-00002-of-00007.safetensors`); the shard's
/// index and count if so.
pub fn shard_file_name(path: &Path) -> Option<ShardSpec> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("shard-")?.strip_suffix(".safetensors")?;
    let (i, n) = rest.split_once("-of-")?;
    let spec = ShardSpec::new(i.parse().ok()?, n.parse().ok()?).ok()?;
    (spec.file_name() == name).then_some(spec)
}
