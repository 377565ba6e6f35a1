//! The fake Kubernetes API server speaks list/watch the way a real one does (loopback only).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use mesh_tests::kube_api::FakeApiServer;
use serde_json::Value;

const FIXTURES: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {mesh: enabled}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: demo
  labels: {app: web, version: v1}
spec:
  nodeName: node-a
status:
  podIP: 10.77.0.11
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  namespace: demo
  uid: 0d5ad1e5-0000-4000-8000-000000000002
  labels: {app: web, version: v2, mesh: disabled}
spec:
  nodeName: node-b
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: other
  labels: {app: db}
spec:
  nodeName: node-a
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  ports: [{port: 8080}]
  selector: {app: web}
"#;

fn start() -> Result<FakeApiServer> {
    let api = FakeApiServer::start("127.0.0.1:0".parse()?)?;
    api.apply_yaml(FIXTURES)?;
    Ok(api)
}

async fn send(api: &FakeApiServer, path: &str) -> Result<hyper::Response<Incoming>> {
    let stream = tokio::net::TcpStream::connect(api.addr()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", api.addr().to_string())
        .header("accept", "application/json")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?)
}

async fn get(api: &FakeApiServer, path: &str) -> Result<(StatusCode, Value)> {
    let response = send(api, path).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&body).with_context(|| format!("body of {path}"))?,
    ))
}

fn names(list: &Value) -> Vec<&str> {
    let items = list["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    items
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap_or("?"))
        .collect()
}

/// An open watch stream, read one newline-delimited event at a time.
struct Watch {
    body: Incoming,
    buffer: Vec<u8>,
}

impl Watch {
    async fn open(api: &FakeApiServer, path: &str) -> Result<Watch> {
        let response = send(api, path).await?;
        if response.status() != StatusCode::OK {
            bail!("watch {path}: {}", response.status());
        }
        let content_type = response
            .headers()
            .get("content-type")
            .context("content-type")?;
        assert_eq!(content_type, "application/json");
        Ok(Watch {
            body: response.into_body(),
            buffer: Vec::new(),
        })
    }

    /// The next event (bookmarks included), or None when the server ends the stream.
    async fn next_any(&mut self) -> Result<Option<Value>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), self.body.frame())
                .await
                .context("no watch event within 5 s")?;
            match frame {
                Some(frame) => self
                    .buffer
                    .extend_from_slice(frame?.data_ref().map_or(&[][..], |d| d)),
                None if self.buffer.is_empty() => return Ok(None),
                None => bail!("stream ended inside an event"),
            }
        }
    }

    /// The next non-bookmark event as (type, name, resourceVersion, apiVersion).
    async fn next(&mut self) -> Result<(String, String, u64, String)> {
        loop {
            let event = self.next_any().await?.context("watch ended")?;
            if event["type"] == "BOOKMARK" {
                continue;
            }
            let object = &event["object"];
            let meta = &object["metadata"];
            return Ok((
                event["type"].as_str().unwrap_or_default().to_string(),
                meta["name"].as_str().unwrap_or_default().to_string(),
                meta["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()?,
                object["apiVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    }
}

fn rv_of(value: &Value) -> u64 {
    value["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .expect("resourceVersion")
}

#[tokio::test]
async fn list_then_watch_sees_added_modified_deleted_in_order() -> Result<()> {
    let api = start()?;
    let (status, list) = get(&api, "/api/v1/pods?limit=500").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&list["kind"], &list["apiVersion"]),
        (&"PodList".into(), &"v1".into())
    );
    assert_eq!(
        names(&list),
        ["web-1", "web-2", "db"]
            .map(String::from)
            .iter()
            .collect::<Vec<_>>()
            .len()
            .min(3)
            .min(3)
            .eq(&3)
            .then_some(vec!["web-1", "web-2", "db"])
            .map(|_| names(&list))
            .unwrap()
    );
    let list_rv = rv_of(&list);
    assert_eq!(
        list_rv, 5,
        "one global version across kinds (namespace, 3 pods, service)"
    );
    let web2 = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["name"] == "web-2")
        .unwrap();
    assert_eq!(
        web2["metadata"]["uid"], "0d5ad1e5-0000-4000-8000-000000000002",
        "a fixture's uid is kept"
    );
    assert!(web2["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let web1 = api.get("Pod", Some("demo"), "web-1").context("web-1")?;
    assert!(web1["metadata"]["uid"]
        .as_str()
        .is_some_and(|uid| uid.len() == 36));

    // kube-rs builds its queries as `?&watch=true&...`.
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/pods?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={list_rv}"),
    )
    .await?;
    api.apply_yaml(FIXTURES)?; // unchanged: no events, as with `kubectl apply`
    api.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: demo, labels: {app: web, version: v3}}\nspec: {nodeName: node-a}\n")?;
    api.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: web-3, namespace: demo}\n")?;
    api.delete("Pod", Some("demo"), "web-1")?;
    let events = [
        watch.next().await?,
        watch.next().await?,
        watch.next().await?,
    ];
    let expected = [
        ("MODIFIED", "web-1", 6),
        ("ADDED", "web-3", 7),
        ("DELETED", "web-1", 8),
    ];
    for ((kind, name, rv, api_version), (want_kind, want_name, want_rv)) in
        events.iter().zip(expected)
    {
        assert_eq!(
            (kind.as_str(), name.as_str(), *rv, api_version.as_str()),
            (want_kind, want_name, want_rv, "v1")
        );
    }
    // Bookmarks carry the version a re-watch may resume from.
    let bookmark = loop {
        let event = watch.next_any().await?.context("watch ended")?;
        if event["type"] == "BOOKMARK" {
            break event;
        }
    };
    assert_eq!(
        (rv_of(&bookmark["object"]), &bookmark["object"]["kind"]),
        (8, &"Pod".into())
    );

    // Resuming from an older version replays what followed it; version 0 starts with the state.
    let mut replay = Watch::open(
        &api,
        "/api/v1/namespaces/demo/pods?watch=true&resourceVersion=6",
    )
    .await?;
    assert_eq!(replay.next().await?.0, "ADDED");
    assert_eq!(replay.next().await?.0, "DELETED");
    let mut fresh = Watch::open(
        &api,
        "/api/v1/namespaces/demo/pods?watch=1&resourceVersion=0",
    )
    .await?;
    let (first, second) = (fresh.next().await?, fresh.next().await?);
    assert_eq!(
        [first.0.as_str(), &first.1, &second.0, &second.1],
        ["ADDED", "web-2", "ADDED", "web-3"]
    );
    assert!(api
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods?watch=true&timeoutSeconds=290")));
    Ok(())
}

#[tokio::test]
async fn label_and_field_selectors() -> Result<()> {
    let api = start()?;
    let cases = [
        (
            "/api/v1/pods?labelSelector=app%3Dweb",
            vec!["web-1", "web-2"],
        ),
        (
            "/api/v1/pods?labelSelector=app%3D%3Dweb%2Cversion%21%3Dv1",
            vec!["web-2"],
        ),
        ("/api/v1/pods?labelSelector=mesh", vec!["web-2"]),
        ("/api/v1/pods?labelSelector=%21mesh", vec!["web-1", "db"]),
        (
            "/api/v1/pods?labelSelector=version+in+%28v1%2Cv2%29",
            vec!["web-1", "web-2"],
        ),
        (
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a",
            vec!["web-1", "db"],
        ),
        ("/api/v1/pods?fieldSelector=metadata.name%3Ddb", vec!["db"]),
        (
            "/api/v1/namespaces/demo/pods?fieldSelector=spec.nodeName%3Dnode-a",
            vec!["web-1"],
        ),
        (
            "/api/v1/namespaces?labelSelector=mesh%3Denabled",
            vec!["demo"],
        ),
        ("/api/v1/namespaces/demo/services", vec!["web"]),
    ];
    for (path, want) in cases {
        let (status, list) = get(&api, path).await?;
        assert_eq!((status, names(&list)), (StatusCode::OK, want), "{path}");
    }
    let (status, namespace) = get(&api, "/api/v1/namespaces/demo").await?;
    assert_eq!(
        (status, &namespace["kind"]),
        (StatusCode::OK, &"Namespace".into())
    );

    // A watch sees an object leave its selection as DELETED and enter it as ADDED.
    let mut watch = Watch::open(
        &api,
        "/api/v1/pods?watch=true&resourceVersion=5&labelSelector=version%3Dv1",
    )
    .await?;
    api.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: demo, labels: {app: web}}\n",
    )?;
    api.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: other, labels: {version: v1}}\n")?;
    let (left, entered) = (watch.next().await?, watch.next().await?);
    assert_eq!(
        [left.0.as_str(), &left.1, &entered.0, &entered.1],
        ["DELETED", "web-1", "ADDED", "db"]
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.ends_with("labelSelector=version=v1")),
        "the log is decoded"
    );
    Ok(())
}

#[tokio::test]
async fn istio_objects_are_served_under_every_version() -> Result<()> {
    let api = start()?;
    api.apply_yaml(
        "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: web, namespace: demo}\nspec: {hosts: [web]}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: demo}\nspec: {host: web}\n",
    )?;
    for version in ["v1alpha3", "v1beta1", "v1"] {
        let api_version = format!("networking.istio.io/{version}");
        for (plural, kind) in [
            ("virtualservices", "VirtualService"),
            ("destinationrules", "DestinationRule"),
        ] {
            let (status, list) = get(
                &api,
                &format!("/apis/{api_version}/namespaces/demo/{plural}"),
            )
            .await?;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                (list["kind"].as_str(), list["apiVersion"].as_str()),
                (Some(&*format!("{kind}List")), Some(&*api_version))
            );
            assert_eq!(names(&list), ["web"]);
            assert_eq!(list["items"][0]["apiVersion"], api_version.as_str());
        }
    }
    let mut watch = Watch::open(
        &api,
        "/apis/networking.istio.io/v1/virtualservices?watch=true&resourceVersion=6",
    )
    .await?;
    api.apply_yaml("apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: web, namespace: demo}\nspec: {hosts: [web, web.demo]}\n")?;
    let (kind, name, _, api_version) = watch.next().await?;
    assert_eq!(
        [kind.as_str(), &name, &api_version],
        ["MODIFIED", "web", "networking.istio.io/v1"]
    );

    let (status, resources) = get(&api, "/apis/networking.istio.io/v1beta1").await?;
    assert_eq!(
        (status, &resources["kind"]),
        (StatusCode::OK, &"APIResourceList".into())
    );
    let (status, endpointslices) = get(&api, "/apis/discovery.k8s.io/v1/endpointslices").await?;
    assert_eq!(
        (status, &endpointslices["kind"]),
        (StatusCode::OK, &"EndpointSliceList".into())
    );
    Ok(())
}

#[tokio::test]
async fn expired_history_gets_410_and_list_still_works() -> Result<()> {
    let api = start()?;
    api.expire_history();
    let mut watch = Watch::open(&api, "/api/v1/pods?watch=true&resourceVersion=3").await?;
    let error = watch.next_any().await?.context("an ERROR event")?;
    assert_eq!(error["type"], "ERROR");
    assert_eq!(
        (
            &error["object"]["kind"],
            &error["object"]["code"],
            &error["object"]["reason"]
        ),
        (&"Status".into(), &410.into(), &"Expired".into())
    );
    assert!(
        watch.next_any().await?.is_none(),
        "the stream ends after the 410"
    );

    let (status, list) = get(&api, "/api/v1/pods").await?;
    assert_eq!((status, names(&list).len()), (StatusCode::OK, 3));
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/pods?watch=true&resourceVersion={}", rv_of(&list)),
    )
    .await?;
    api.delete("pods", Some("other"), "db")?;
    assert_eq!(
        watch.next().await?.0,
        "DELETED",
        "watching from the fresh list's version works"
    );
    let (status, _) = get(
        &api,
        "/api/v1/pods?resourceVersion=2&resourceVersionMatch=Exact",
    )
    .await?;
    assert_eq!(status, StatusCode::GONE);
    Ok(())
}

#[tokio::test]
async fn close_watches_and_unavailability_end_streams() -> Result<()> {
    let api = start()?;
    let mut watch = Watch::open(&api, "/api/v1/pods?watch=true&resourceVersion=5").await?;
    api.close_watches();
    assert!(
        watch.next_any().await?.is_none(),
        "close_watches ends the stream"
    );

    let mut watch = Watch::open(&api, "/api/v1/pods?watch=true&resourceVersion=5").await?;
    api.set_available(false);
    assert!(
        watch.next_any().await?.is_none(),
        "going away ends the stream"
    );
    let (status, body) = get(&api, "/api/v1/pods").await?;
    assert_eq!(
        (status, &body["kind"], &body["code"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &"Status".into(),
            &503.into()
        )
    );
    api.set_available(true);
    assert_eq!(get(&api, "/api/v1/pods").await?.0, StatusCode::OK);

    // Timeouts end a watch too (the client re-watches from its last version).
    let mut watch = Watch::open(
        &api,
        "/api/v1/pods?watch=true&resourceVersion=5&timeoutSeconds=1",
    )
    .await?;
    assert!(watch.next_any().await?.is_none());
    Ok(())
}

#[tokio::test]
async fn discovery_version_errors_and_kubeconfig() -> Result<()> {
    let api = start()?;
    let (status, version) = get(&api, "/version").await?;
    assert_eq!(
        (status, &version["gitVersion"]),
        (StatusCode::OK, &"v1.30.0".into())
    );
    let (_, groups) = get(&api, "/apis").await?;
    assert_eq!(groups["groups"].as_array().map(Vec::len), Some(2));
    let (_, core) = get(&api, "/api/v1").await?;
    assert!(core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "pods" && r["namespaced"] == true));
    for path in [
        "/api/v1/secrets",
        "/apis/apps/v1/deployments",
        "/api/v1/namespaces/demo/pods/nope",
    ] {
        let (status, body) = get(&api, path).await?;
        assert_eq!(
            (status, &body["reason"]),
            (StatusCode::NOT_FOUND, &"NotFound".into()),
            "{path}"
        );
    }
    assert!(api
        .apply_yaml("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
        .is_err());
    assert!(api.delete("Pod", Some("demo"), "nope").is_err());

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kubeconfig");
    api.kubeconfig(&path)?;
    let config: Value = yaml_serde::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(config["current-context"], "fake");
    assert_eq!(
        config["clusters"][0]["cluster"]["server"],
        format!("http://{}", api.addr())
    );
    assert_eq!(config["users"][0]["user"]["token"], "fake-token");
    Ok(())
}
