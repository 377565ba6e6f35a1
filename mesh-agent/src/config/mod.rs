//! Raw Kubernetes/Istio objects in, validated `model` out.

pub mod model;
