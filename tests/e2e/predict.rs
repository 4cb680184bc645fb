//! kd-predict on image files: the Fashion-MNIST test images written out as PNG files get
//! exactly the logits the evaluation computes for them in memory; bad input is named.

use crate::fixture::{flags, pipeline_args, run};
use candle_core::Device;
use clap::Parser;
use std::path::Path;

fn predict(root: &Path, extra: &[&str]) -> anyhow::Result<Vec<kd_predict::Prediction>> {
    kd_predict::run(&kd_predict::Args::try_parse_from(flags(
        "kd-predict",
        root,
        extra,
    ))?)
}

#[test]
fn png_files_get_the_logits_of_the_evaluation() {
    let run = run();
    let root = run.root.path();
    let data = pipeline_args(root).open(&[]).unwrap().load_data().unwrap();
    let test = &data.dataset.test;
    // The first 12 test images as grey PNGs, some in a subfolder (folders are searched).
    let pngs = tempfile::tempdir().unwrap();
    std::fs::create_dir(pngs.path().join("more")).unwrap();
    let n = 12;
    let plane = test.height * test.width;
    for i in 0..n {
        let img = image::GrayImage::from_raw(
            test.width as u32,
            test.height as u32,
            test.images[i * plane..(i + 1) * plane].to_vec(),
        )
        .unwrap();
        let sub = if i < 8 { "" } else { "more" };
        img.save(pngs.path().join(sub).join(format!("img-{i:02}.png")))
            .unwrap();
    }
    for (model, arch) in [("student-kd", "student-cnn"), ("teacher", "googlenet")] {
        let got = predict(
            root,
            &[
                "--model",
                model,
                "--top",
                "10",
                "--batch-size",
                "5",
                pngs.path().to_str().unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(got.len(), n);
        let m = kd_models::load_frozen(
            arch,
            &data.spec,
            &run.dir(model).join("model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let rows: Vec<u32> = (0..n as u32).collect();
        let want = &kd_train::predict(
            m.as_ref(),
            kd_train::Subset {
                images: &data.test_images,
                labels: &data.test_labels,
                rows: &rows,
            },
            64,
            "",
        )
        .unwrap()[0];
        for (i, p) in got.iter().enumerate() {
            // In name order: img-00..07, then more/img-08..11.
            assert!(p.file.ends_with(format!("img-{i:02}.png")), "{:?}", p.file);
            let w = &want[i * 10..(i + 1) * 10];
            for (a, b) in p.logits.iter().zip(w) {
                assert!((a - b).abs() < 1e-4, "{model} image {i}: {a} vs {b}");
            }
            let argmax = (0..10).max_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap();
            assert_eq!(p.top[0].index, argmax, "{model} image {i}");
            assert_eq!(p.top.len(), 10);
            let total: f32 = p.top.iter().map(|s| s.probability).sum();
            assert!((total - 1.0).abs() < 1e-5, "{total}");
            assert!(p
                .top
                .windows(2)
                .all(|w| w[0].probability >= w[1].probability));
        }
        // Class names from the model's class index.
        assert!(["T-shirt/top", "Trouser", "Ankle boot"]
            .iter()
            .any(|c| got.iter().any(|p| p.top[0].class == *c)));
    }
}

#[test]
fn bad_input_is_named() {
    let run = run();
    let root = run.root.path();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("not-an-image.png");
    std::fs::write(&bad, b"hello").unwrap();
    let err = |extra: &[&str]| format!("{:#}", predict(root, extra).unwrap_err());
    let e = err(&[bad.to_str().unwrap()]);
    assert!(
        e.contains("not-an-image.png") && e.contains("not a readable"),
        "{e}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = err(&[empty.to_str().unwrap()]);
    assert!(e.contains("empty") && e.contains("no PNG or JPEG"), "{e}");
    let e = err(&["/no/such/file.png"]);
    assert!(
        e.contains("/no/such/file.png") && e.contains("no such file"),
        "{e}"
    );
    let e = err(&["--tag", "no-such-run", bad.to_str().unwrap()]);
    assert!(e.contains("no-such-run"), "{e}");
    let e = err(&["--model", "knowledge", bad.to_str().unwrap()]);
    assert!(e.contains("--model"), "{e}");
}
