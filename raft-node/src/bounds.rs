//! Terms and log indexes from the network stay far from overflow.
//!
//! openraft computes `term + 1` when it starts an election and this node `index + 1` for WAL
//! positions, with overflow checks on: a message naming term `u64::MAX` made every node's Raft
//! core panic, and because the term is saved with the vote, panic again after every restart.
//! Every Raft message decoded from a peer, request or reply, is checked against `TERM_MAX` and
//! `INDEX_MAX` before openraft sees it; so is the vote read back from disk.

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError, StreamAppendResult,
    TransferLeaderError, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};

use crate::types::{LogId, SnapshotMeta, TypeConfig, Vote};

/// The largest term accepted: an election every millisecond would take 146 million years to
/// get there, and it is still 2^62 elections short of overflowing.
pub const TERM_MAX: u64 = 1 << 62;
/// The largest log index accepted: 2^62 entries is far beyond any disk.
pub const INDEX_MAX: u64 = 1 << 62;

/// A message whose terms and indexes can be checked.
pub trait Bounded {
    /// `Err` names the first term or index out of bounds.
    fn check_bounds(&self) -> Result<(), String>;
}

pub fn check_vote(vote: &Vote) -> Result<(), String> {
    let term = vote.leader_id.term;
    if term > TERM_MAX {
        return Err(format!("term {term} is beyond the largest accepted ({TERM_MAX})"));
    }
    Ok(())
}

fn check_log_id(id: Option<&LogId>) -> Result<(), String> {
    let Some(id) = id else { return Ok(()) };
    if id.leader_id.term > TERM_MAX {
        return Err(format!("log id term {} is beyond the largest accepted ({TERM_MAX})", id.leader_id.term));
    }
    if id.index > INDEX_MAX {
        return Err(format!("log index {} is beyond the largest accepted ({INDEX_MAX})", id.index));
    }
    Ok(())
}

impl Bounded for AppendEntriesRequest<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        check_vote(&self.vote)?;
        check_log_id(self.prev_log_id.as_ref())?;
        check_log_id(self.leader_commit.as_ref())?;
        self.entries.iter().try_for_each(|entry| check_log_id(Some(&entry.log_id)))
    }
}

impl Bounded for AppendEntriesResponse<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        match self {
            AppendEntriesResponse::Success | AppendEntriesResponse::Conflict => Ok(()),
            AppendEntriesResponse::PartialSuccess(id) => check_log_id(id.as_ref()),
            AppendEntriesResponse::HigherVote(vote) => check_vote(vote),
        }
    }
}

/// One answer on an append stream (`net::raft`'s `AppendStream`).
impl Bounded for StreamAppendResult<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        match self {
            Ok(id) => check_log_id(id.as_ref()),
            Err(StreamAppendError::Conflict(id)) => check_log_id(Some(id)),
            Err(StreamAppendError::HigherVote(vote)) => check_vote(vote),
        }
    }
}

impl Bounded for VoteRequest<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        check_vote(&self.vote)?;
        check_log_id(self.last_log_id.as_ref())
    }
}

impl Bounded for VoteResponse<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        check_vote(&self.vote)?;
        check_log_id(self.last_log_id.as_ref())
    }
}

impl Bounded for TransferLeaderRequest<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        check_vote(self.from_leader())?;
        check_log_id(self.last_log_id())
    }
}

impl Bounded for TransferLeaderResponse<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        match self {
            Ok(()) => Ok(()),
            Err(TransferLeaderError::VoteChanged { expected, actual }) => {
                check_vote(expected)?;
                check_vote(actual)
            }
            Err(TransferLeaderError::LogNotFlushed { expected, actual }) => {
                check_log_id(expected.as_ref())?;
                check_log_id(actual.as_ref())
            }
        }
    }
}

impl Bounded for SnapshotResponse<TypeConfig> {
    fn check_bounds(&self) -> Result<(), String> {
        check_vote(&self.vote)
    }
}

/// A snapshot stream's header: the leader's vote and the snapshot's meta.
impl Bounded for (Vote, SnapshotMeta) {
    fn check_bounds(&self) -> Result<(), String> {
        check_vote(&self.0)?;
        check_log_id(self.1.last_log_id.as_ref())?;
        check_log_id(self.1.last_membership.log_id().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{blank_ent, log_id};

    use super::*;

    fn vote(term: u64) -> Vote {
        Vote::new_committed(term, 1)
    }

    /// One row per place a term or an index travels: at the bound it passes, past it it is refused.
    #[test]
    fn terms_and_indexes_past_the_bound_are_refused_wherever_they_travel() {
        let append = |term: u64, index: u64| AppendEntriesRequest::<TypeConfig> {
            vote: vote(1),
            prev_log_id: Some(log_id::<TypeConfig>(1, 1, 1)),
            entries: vec![blank_ent::<TypeConfig>(term, 1, index)],
            leader_commit: None,
        };
        type Make<'a> = Box<dyn Fn(u64) -> Box<dyn Bounded> + 'a>;
        let rows: Vec<(&str, Make)> = vec![
            (
                "append entries vote",
                Box::new(|t| Box::new(AppendEntriesRequest::<TypeConfig> { vote: vote(t), ..append(1, 2) })),
            ),
            ("entry term", Box::new(move |t| Box::new(append(t, 2)))),
            ("entry index", Box::new(move |i| Box::new(append(1, i)))),
            (
                "leader commit",
                Box::new(|i| {
                    Box::new(AppendEntriesRequest::<TypeConfig> {
                        leader_commit: Some(log_id::<TypeConfig>(1, 1, i)),
                        ..append(1, 2)
                    })
                }),
            ),
            (
                "higher vote reply",
                Box::new(|t| Box::new(AppendEntriesResponse::<TypeConfig>::HigherVote(vote(t)))),
            ),
            (
                "vote request",
                Box::new(|t| {
                    Box::new(VoteRequest::<TypeConfig> {
                        vote: vote(t),
                        last_log_id: None,
                        leadership_transfer: false,
                    })
                }),
            ),
            (
                "vote reply log id",
                Box::new(|i| {
                    Box::new(VoteResponse::<TypeConfig> {
                        vote: vote(1),
                        vote_granted: false,
                        last_log_id: Some(log_id::<TypeConfig>(1, 1, i)),
                    })
                }),
            ),
            (
                "transfer leader",
                Box::new(|t| Box::new(TransferLeaderRequest::<TypeConfig>::new(vote(t), 2, None))),
            ),
            ("snapshot reply", Box::new(|t| Box::new(SnapshotResponse::<TypeConfig>::new(vote(t))))),
        ];
        for (what, make) in rows {
            assert_eq!(make(TERM_MAX).check_bounds(), Ok(()), "{what} at the bound");
            for beyond in [TERM_MAX + 1, u64::MAX] {
                assert!(make(beyond).check_bounds().is_err(), "{what} at {beyond} was accepted");
            }
        }
    }
}
