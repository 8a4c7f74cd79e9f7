//! What the client holds of each type: the resources as Pilot sent them
//! and what each compiled to, so that a response compiles only what it
//! changed.

use std::{collections::BTreeMap, sync::Arc};

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::Update;
use crate::config::Problem;

/// A resource as Pilot sent it, and what it compiled to.
pub(super) struct Compiled<T, C> {
    raw: T,
    compiled: Arc<C>,
}

/// The resources of one type held, by name.
pub(super) type HeldMap<T, C> = BTreeMap<String, Compiled<T, C>>;

/// Every resource of `next`, compiled unless it is the one `held` already
/// compiled; a resource that does not compile refuses them all.
pub(super) fn compile_changed<T: PartialEq, C>(
    held: &HeldMap<T, C>,
    next: BTreeMap<String, T>,
    compile: impl Fn(&T) -> Result<C, Problem>,
) -> Result<HeldMap<T, C>, Problem> {
    next.into_iter()
        .map(|(name, raw)| {
            let compiled = match held.get(&name) {
                Some(h) if h.raw == raw => h.compiled.clone(),
                _ => Arc::new(compile(&raw)?),
            };
            Ok((name, Compiled { raw, compiled }))
        })
        .collect()
}

/// What `held` compiled to, by name, as the snapshot keeps it.
pub(super) fn compiled<T, C, M: FromIterator<(String, Arc<C>)>>(held: &HeldMap<T, C>) -> M {
    held.iter()
        .map(|(name, c)| (name.clone(), c.compiled.clone()))
        .collect()
}

/// The raw resources of `held` with `update` applied. Named types
/// (`names` given) keep only the names subscribed; state-of-the-world
/// responses of them carry only what changed, so they are laid over what
/// is held.
pub(super) fn next_held<T: Message + Default + Clone, C>(
    held: &HeldMap<T, C>,
    update: Update,
    name: impl Fn(&T) -> String,
    names: Option<&[String]>,
) -> Result<BTreeMap<String, T>, Problem> {
    let raw = || -> BTreeMap<String, T> {
        held.iter()
            .map(|(n, c)| (n.clone(), c.raw.clone()))
            .collect()
    };
    let mut out = match update {
        Update::Sotw(resources) => {
            let update = decode_all(&resources, &name)?;
            match names {
                Some(_) => {
                    let mut out = raw();
                    out.extend(update);
                    out
                }
                None => update,
            }
        }
        Update::Delta { added, removed } => {
            let mut out = raw();
            for gone in &removed {
                out.remove(gone);
            }
            let added: Vec<Any> = added.into_iter().map(|(_, _, any)| any).collect();
            out.extend(decode_all(&added, &name)?);
            out
        }
    };
    if let Some(names) = names
        && !names.is_empty()
    {
        out.retain(|n, _| names.binary_search(n).is_ok());
    }
    Ok(out)
}

fn decode_all<T: Message + Default>(
    resources: &[Any],
    name: &impl Fn(&T) -> String,
) -> Result<BTreeMap<String, T>, Problem> {
    resources
        .iter()
        .map(|any| {
            let r = T::decode(any.value.as_slice()).map_err(|e| {
                Problem(format!(
                    "a resource of {:?} does not decode: {e}",
                    any.type_url
                ))
            })?;
            Ok((name(&r), r))
        })
        .collect()
}
