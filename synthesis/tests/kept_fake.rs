//! Resuming a kept VM directory and exporting a base to a file, over the in-memory hypervisor.

mod fake;

use std::time::Duration;

use base_registry::Registry;
use fake::{tree, FakeHypervisor};
use synthesis::{
    create_base, create_overlay_file, export_base_file, resume_kept, synthesize_with, FlowError, HttpCheck,
    SynthesisOptions,
};
use vm_driver::Vm;

fn live(hv: &FakeHypervisor) -> usize {
    hv.live.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn a_kept_vm_resumes_again_and_a_port_it_does_not_forward_is_refused_first() {
    let tmp = tempfile::tempdir().unwrap();
    let hv = FakeHypervisor::new();
    let registry = Registry::open(&tmp.path().join("registry")).unwrap();
    let (base, _) = create_base(&hv, &registry, &fake::base_request(tmp.path()), &|_| {}).unwrap();
    let overlay = tmp.path().join("app.overlay");
    create_overlay_file(&hv, &base, &fake::overlay_request(&overlay), &|_| {}).unwrap();
    let dir = tmp.path().join("vm");
    let opts = SynthesisOptions::new(&dir);
    let s = synthesize_with(&hv, &registry, std::fs::File::open(&overlay).unwrap(), &opts, &|_| {}).unwrap();
    s.vm.shutdown().unwrap();
    let before = tree(&dir);

    let restores = || hv.calls().iter().filter(|c| *c == "restore").count();
    let n = restores();
    match resume_kept(&hv, &dir, Some(&HttpCheck::new(9999, Duration::from_secs(1))), &|_| {}) {
        Err(FlowError::NotForwarded { port: 9999, forwarded }) => assert_eq!(forwarded, [8080]),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("port 9999 is not forwarded"),
    }
    assert_eq!(restores(), n, "nothing is started for a port that is not forwarded");

    let r = resume_kept(&hv, &dir, Some(&HttpCheck::new(8080, Duration::from_secs(5))), &|_| {}).unwrap();
    assert!(r.answer.as_ref().unwrap().body().contains("fake app"), "{:?}", r.answer);
    assert_eq!(live(&hv), 1);
    r.vm.shutdown().unwrap();
    assert_eq!(live(&hv), 0);

    hv.set(|f| f.http_silent = true);
    let e = resume_kept(&hv, &dir, Some(&HttpCheck::new(8080, Duration::from_millis(600))), &|_| {})
        .err()
        .expect("the app does not answer");
    assert!(matches!(e, FlowError::NoAnswer { guest_port: Some(8080), .. }), "{e:?}");
    assert_eq!(live(&hv), 0, "a VM whose app does not answer is stopped");
    assert_eq!(tree(&dir), before, "resuming does not change the directory");

    assert!(resume_kept(&hv, &tmp.path().join("nothing"), None, &|_| {}).is_err());
}

#[test]
fn an_export_never_replaces_a_file_and_leaves_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let hv = FakeHypervisor::new();
    let registry = Registry::open(&tmp.path().join("registry")).unwrap();
    let (base, _) = create_base(&hv, &registry, &fake::base_request(tmp.path()), &|_| {}).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("deb.base.partial"), "mine").unwrap();

    export_base_file(&registry, &base.id(), &out.join("deb.base")).unwrap();
    assert_eq!(tree(&out), ["deb.base", "deb.base.partial"]);
    assert_eq!(std::fs::read_to_string(out.join("deb.base.partial")).unwrap(), "mine");

    let other = Registry::open(&tmp.path().join("other")).unwrap();
    let imported = other.import(std::fs::File::open(out.join("deb.base")).unwrap()).unwrap();
    assert_eq!(imported.manifest.id, base.id());

    match export_base_file(&registry, &base.id(), &out.join("deb.base.partial")) {
        Err(FlowError::Exists { path }) => assert_eq!(path, out.join("deb.base.partial")),
        r => panic!("{r:?}"),
    }
    assert_eq!(std::fs::read_to_string(out.join("deb.base.partial")).unwrap(), "mine");
    assert_eq!(tree(&out), ["deb.base", "deb.base.partial"]);
}
